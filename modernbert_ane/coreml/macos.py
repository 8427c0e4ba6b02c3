"""Core ML on macOS: every call into Core ML is in one function here: compile_package (to .mlmodelc),
load_coreml (the one place a model is loaded) and compute_plan_records (MLComputePlan). Around them, the parts
that run and are tested on any OS: compute-unit names, the compiled-model cache (keyed by the package's content
hash) and the load report in words.
"""
import hashlib
import os
import sys
import time
from pathlib import Path

from modernbert_ane.output_files import staging_folder
from modernbert_ane.coreml.package import PackageError
from modernbert_ane.coreml.quiet_coremltools import import_coremltools
from modernbert_ane.user_errors import UserError

# --compute-units name -> ct.ComputeUnit member (the names coremltools exposes on every OS)
COMPUTE_UNITS = {"all": "ALL", "cpu-and-ne": "CPU_AND_NE", "cpu-and-gpu": "CPU_AND_GPU", "cpu-only": "CPU_ONLY"}
DEFAULT_COMPUTE_UNITS = "cpu-and-ne"               # the Neural Engine, with the CPU for what it cannot run
CACHE_DIR_NAME = "modernbert-ane"


def compute_unit(name: str):
    """The ct.ComputeUnit of a --compute-units name."""
    if name not in COMPUTE_UNITS:
        raise UserError(f"unknown compute units '{name}' (one of {', '.join(COMPUTE_UNITS)})")
    return getattr(import_coremltools().ComputeUnit, COMPUTE_UNITS[name])


def package_hash(path) -> str:
    """SHA-256 of a package's files (relative paths and contents, in sorted order): the same bytes give the
    same key wherever the package lies, and any changed, added or renamed file gives another."""
    path, digest = Path(path), hashlib.sha256()
    for file in sorted(f for f in path.rglob("*") if f.is_file()):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


def cache_dir(platform_name: str | None = None) -> Path:
    """Where compiled packages are kept: $XDG_CACHE_HOME when set, else ~/Library/Caches on macOS and
    ~/.cache elsewhere; a modernbert-ane folder inside."""
    platform_name = platform_name or sys.platform
    base = os.environ.get("XDG_CACHE_HOME")
    if not base or not os.path.isabs(base):                      # the XDG spec: a relative path is ignored
        base = Path.home() / ("Library/Caches" if platform_name == "darwin" else ".cache")
    return Path(base).expanduser() / CACHE_DIR_NAME


def compiled_path(package, digest: str | None = None) -> Path:
    """The cache entry of a package: <cache>/<content hash>.mlmodelc."""
    return cache_dir() / f"{digest or package_hash(package)}.mlmodelc"


def compile_package(package, target: Path) -> None:
    """Compile a package with Core ML into `target` (an .mlmodelc), atomically: built beside it and renamed;
    a copy another process put there first is kept."""
    ct = import_coremltools()
    target.parent.mkdir(parents=True, exist_ok=True)
    with staging_folder(target) as staging:
        built = ct.utils.compile_model(str(package), str(staging / target.name))
        try:
            os.replace(built, target)
        except OSError:
            if not target.is_dir():
                raise


def load_coreml(package, compute_units: str = DEFAULT_COMPUTE_UNITS, function: str | None = None,
                use_cache: bool = True):
    """(model, load report) for a package on macOS: the one place Core ML loads a model. With the cache, the
    package is compiled once to <cache>/<content hash>.mlmodelc and later loads read that (CompiledMLModel);
    without it, MLModel compiles it again. The report gives the times in seconds and whether the cache hit."""
    ct = import_coremltools()
    units = compute_unit(compute_units)
    named = {"function_name": function} if function else {}
    report = {"compute_units": compute_units, "cache": "off", "hash_s": 0.0, "compile_s": 0.0}
    start = time.perf_counter()
    if not use_cache:
        model = ct.models.MLModel(str(package), compute_units=units, **named)      # compiles, then loads
        report["load_s"] = time.perf_counter() - start
        return model, report
    target = compiled_path(package)
    report["hash_s"] = time.perf_counter() - start
    report["cache"], report["compiled_path"] = ("hit" if target.is_dir() else "miss"), str(target)
    if report["cache"] == "miss":
        start = time.perf_counter()
        compile_package(package, target)
        report["compile_s"] = time.perf_counter() - start
    start = time.perf_counter()
    model = ct.models.CompiledMLModel(str(target), compute_units=units, **named)
    report["load_s"] = time.perf_counter() - start
    return model, report


# MLComputePlan's device classes -> the names our reports use
DEVICE_NAMES = {"MLNeuralEngineComputeDevice": "neural_engine", "MLGPUComputeDevice": "gpu", "MLCPUComputeDevice": "cpu"}


def compute_plan_records(compiled, compute_units: str = DEFAULT_COMPUTE_UNITS, function: str = "main") -> list[dict]:
    """Where Core ML plans to run each op of a compiled model (.mlmodelc), macOS 14.4+ (MLComputePlan): one
    plain record per non-constant op, {"name" (its first output, as in the package), "op_type", "device"
    (neural_engine, gpu, cpu or None when unknown), "supported" (devices), "cost" (Core ML's estimated share
    of the model's work, or None)}."""
    import_coremltools()                                          # quietly, before its submodule
    from coremltools.models.compute_plan import MLComputePlan
    plan = MLComputePlan.load_from_path(path=str(compiled), compute_units=compute_unit(compute_units))
    program = plan.model_structure.program
    if program is None:
        raise PackageError(f"{compiled} is not an ML Program")
    records = []
    for op in program.functions[function].block.operations:
        if op.operator_name == "const":
            continue
        usage = plan.get_compute_device_usage_for_mlprogram_operation(op)
        cost = plan.get_estimated_cost_for_mlprogram_operation(op)
        device = lambda d: DEVICE_NAMES.get(type(d).__name__, type(d).__name__)
        records.append({"name": op.outputs[0].name if op.outputs else "", "op_type": op.operator_name,
                        "device": device(usage.preferred_compute_device) if usage else None,
                        "supported": [device(d) for d in usage.supported_compute_devices] if usage else [],
                        "cost": cost.weight if cost else None})
    return records


def describe_load(report: dict) -> str:
    """One line on how Core ML got the model, for stderr."""
    if report["cache"] == "off":
        return f"compiled and loaded in {report['load_s']:.1f} s (--no-cache)"
    if report["cache"] == "miss":
        return (f"compiled in {report['compile_s']:.1f} s into the cache, loaded in {report['load_s']:.1f} s "
                f"(hash {report['hash_s']:.1f} s)")
    return f"loaded from the cache in {report['load_s']:.1f} s (hash {report['hash_s']:.1f} s)"


