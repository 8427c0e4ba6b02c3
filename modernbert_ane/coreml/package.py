"""The packages this project writes: their metadata, and running them with Core ML or the emulator.

Knows nothing of ModernBERT's modules, only of what a package of ours declares about itself. Core ML
prediction exists on macOS only; `PackageRunner` is the one place that chooses between it and the
float16 emulator (`modernbert_ane/coreml/emulator/`), so the macOS path stays thin. On macOS a package is compiled
once into a cache keyed by its content hash and loaded from there (`load_coreml`).
"""
import hashlib
import json
import os
import platform
import stat
import sys
import time
from pathlib import Path

import numpy as np

from modernbert_ane import __version__
from modernbert_ane.checkpoint import CheckpointError, confined
from modernbert_ane.output_files import staging_folder
from modernbert_ane.coreml.quiet_coremltools import import_coremltools
from modernbert_ane.user_errors import UserError

PROJECT_VERSION = __version__
METADATA_PREFIX = "modernbert_ane."
BACKENDS = ("auto", "coreml", "emulate")


class PackageError(UserError):
    """A path that is not a readable .mlpackage written by this project."""


def package_spec(path):
    """The package's protobuf spec; a clear error for anything that is not a readable .mlpackage."""
    path = Path(path)
    manifest = path / "Manifest.json"
    if not path.exists():
        raise PackageError(f"no such package: {path}")
    if not path.is_dir() or not manifest.is_file():
        raise PackageError(f"{path} is not an .mlpackage (no Manifest.json)")
    check_package_files(path)
    import_coremltools()
    from coremltools.proto import Model_pb2
    # The files are read directly: coremltools' load_spec opens a package read-write and rewrites its
    # Manifest.json, so that merely reading a package would change it.
    spec_file, spec = model_file(path), Model_pb2.Model()
    try:
        spec.ParseFromString(spec_file.read_bytes())
    except OSError as e:
        raise PackageError(f"cannot read {path}: {spec_file.relative_to(path)}: {e.strerror or e}") from e
    except Exception as e:
        raise PackageError(f"cannot read {path} as a Core ML package (damaged?): {type(e).__name__}: {e}") from e
    return spec


def check_package_files(path: Path) -> None:
    """Everything inside a package stays inside it: no symlink leads out, and there is no FIFO, device or
    socket where Core ML or the emulator would open a file (reading one would hang or read another file)."""
    root = path.resolve()
    for folder, dirs, files in os.walk(path):
        for name in dirs + files:
            entry = Path(folder, name)
            if not entry.resolve().is_relative_to(root):
                raise PackageError(f"{path} holds a link that leaves the package: {entry.relative_to(path)} -> "
                                   f"{entry.resolve()}")
            mode = entry.stat().st_mode if entry.exists() else 0
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise PackageError(f"{path} holds {entry.relative_to(path)}, which is not a regular file "
                                   f"(a FIFO, device, socket or dangling link); is the package damaged?")


def written_by_convert(path) -> bool:
    """Whether `path` is a package a previous convert.py wrote (what `convert.py --force` may replace)."""
    try:
        spec = package_spec(path)
    except UserError:
        return False
    return any(k.startswith(METADATA_PREFIX) for k in spec.description.metadata.userDefined)


def write_metadata(spec, metadata: dict) -> None:
    """Store our metadata in a spec, every value JSON-encoded (sorted, so the same options give the same bytes)."""
    stored = spec.description.metadata.userDefined
    for key in [k for k in stored if k.startswith(METADATA_PREFIX)]:
        del stored[key]
    for key in sorted(metadata):
        value = metadata[key]
        if value is None:
            continue
        stored[METADATA_PREFIX + key] = json.dumps(value, sort_keys=True)            # typed on read


def function_names(spec) -> list[str]:
    """The package's functions, the default first: ["main"] for a single-function package."""
    names = [f.name for f in spec.description.functions]
    if not names:
        return ["main"]
    default = spec.description.defaultFunctionName or names[0]
    return [default] + [n for n in names if n != default]


def function_heads(spec, path) -> dict[str, list[str]]:
    """A package converted with `--shapes functions`: head (the task's name, fill_mask) -> its functions, one per
    length (fill_mask_128, fill_mask_512), from the metadata's per-function "head"; {} for any other package."""
    stored = spec.description.metadata.userDefined.get(METADATA_PREFIX + "functions")
    if not stored:
        return {}
    try:
        functions = json.loads(stored)
    except json.JSONDecodeError as e:
        raise PackageError(f"{path} has damaged {METADATA_PREFIX}functions metadata: {e}") from e
    heads = {}
    for name in function_names(spec):
        entry = functions.get(name) if isinstance(functions, dict) else None
        if isinstance(entry, dict) and _is_name(entry.get("head")):
            heads.setdefault(entry["head"], []).append(name)
    return heads


def resolve_functions(spec, function: str | None, path) -> tuple[str, list[str]]:
    """(the name `function` resolves to, the package's functions that serve it). `function` is a function, or in
    a `--shapes functions` package a head naming its functions of every length; None: the default function, or
    the head it belongs to. A clear error for a name the package does not have."""
    names, heads = function_names(spec), function_heads(spec, path)
    if function is None:
        function = next((head for head, served in heads.items() if names[0] in served), names[0])
    if function in heads:
        return function, heads[function]
    if function not in names:
        raise PackageError(f"{path} has no function '{function}' (it has {', '.join([*heads, *names])})")
    return function, [function]


def resolve_function(spec, function: str | None, path) -> str:
    """`function`, or the package's default when None; a clear error for a function it does not have."""
    return resolve_functions(spec, function, path)[0]


def function_description(spec, function: str | None, path):
    """The description holding a function's inputs and outputs (the model's own for a single function; a head's
    first function's)."""
    function = resolve_functions(spec, function, path)[1][0]
    if not spec.description.functions:
        return spec.description
    return next(f for f in spec.description.functions if f.name == function)


def read_metadata(path, function: str | None = None) -> dict:
    """Our metadata of a package, values parsed back from JSON, for one of its functions (default: the
    package's default). A multi-function package keeps what differs per function (task, output, labels...)
    under "functions"; the function's entries are merged in, and "function" names it."""
    spec = package_spec(path)
    raw = dict(spec.description.metadata.userDefined)
    ours = {k[len(METADATA_PREFIX):]: v for k, v in raw.items() if k.startswith(METADATA_PREFIX)}
    if "task" not in ours and "functions" not in ours:
        raise PackageError(f"{path} was not written by this project's convert.py (no {METADATA_PREFIX}task metadata)")
    try:
        meta = {key: json.loads(value) for key, value in ours.items()}
    except json.JSONDecodeError as e:
        raise PackageError(f"{path} has damaged {METADATA_PREFIX}* metadata: {e}") from e
    function, served = resolve_functions(spec, function, path)
    per_function = meta.pop("functions", None)
    if per_function is not None:
        if not isinstance(per_function, dict) or not all(isinstance(per_function.get(f), dict) for f in served):
            raise PackageError(f"{path} has damaged {METADATA_PREFIX}functions metadata (no entry for '{function}')")
        meta.update(per_function[served[0]])
        if len(served) > 1:                         # a head: every length's function, its costs by length
            meta["seq_lengths"] = sorted(n for f in served for n in per_function[f].get("seq_lengths") or [])
            meta["cost"] = {k: v for f in served for k, v in (per_function[f].get("cost") or {}).items()}
    if "task" not in meta:
        raise PackageError(f"{path} has no task for function '{function}' in its metadata")
    meta = check_metadata(meta, path)
    meta["function"], meta["function_names"] = function, function_names(spec)
    try:
        meta["length_functions"] = length_functions(spec, function, path)
    except PackageError:            # no input_ids: input_lengths() says so where the lengths are needed
        meta["length_functions"] = {}
    return meta


def _is_int(v, low: int) -> bool:
    return type(v) is int and v >= low


def _is_name(v) -> bool:
    return isinstance(v, str) and 0 < len(v) <= 4096


def _is_lengths(v) -> bool:
    return isinstance(v, list) and bool(v) and all(_is_int(n, 2) for n in v)


def _is_prompts(v) -> bool:
    return (isinstance(v, dict) and isinstance(v.get("prompts"), dict) and
            all(isinstance(k, str) and isinstance(t, str) for k, t in v["prompts"].items()) and
            (v.get("default") is None or v.get("default") in v["prompts"]))


# What our metadata holds, by key: a check of its type and range, and what it must be. Keys not listed
# (from a newer converter) are passed through; a listed key that fails its check is a damaged package.
METADATA_TYPES = {
    "task": (_is_name, "a task name"), "output": (_is_name, "an output name"),
    "source": (_is_name, "a checkpoint name"), "tokenizer": (_is_name, "a tokenizer name"),
    "revision": (_is_name, "a revision"), "rotation": (_is_name, "a rotation name"),
    "rotation_seed": (lambda v: _is_int(v, 0), "a non-negative integer"),
    "seq_lengths": (_is_lengths, "a list of lengths >= 2"),
    "hidden_size": (lambda v: _is_int(v, 1), "a positive integer"),
    "vocab_size": (lambda v: _is_int(v, 1), "a positive integer"),
    "embedding_dim": (lambda v: _is_int(v, 1), "a positive integer"),
    "max_texts": (lambda v: _is_int(v, 1), "a positive integer"),
    **{f"{t}_token_id": (lambda v: _is_int(v, 0), "a token id") for t in ("pad", "cls", "sep", "mask")},
    "labels": (lambda v: isinstance(v, list) and bool(v) and all(isinstance(x, (str, int, float, bool)) for x in v),
               "a list of label names"),
    "problem_type": (_is_name, "a problem type"), "pooling": (_is_name, "a pooling name"),
    "normalized": (lambda v: isinstance(v, bool), "true or false"),
    "pairs": (lambda v: isinstance(v, bool), "true or false"),
    "prompts": (_is_prompts, "prompt names mapped to texts"),
    "shapes": (lambda v: v in ("enumerated", "functions"), "enumerated or functions"),
    "head": (_is_name, "a function name"),
}


def check_metadata(meta: dict, path) -> dict:
    """Our metadata, each known key checked by type and range (None: absent). Label names are strings
    whatever JSON value the checkpoint's id2label held (an integer label prints as "0")."""
    for key, (ok, what) in METADATA_TYPES.items():
        value = meta.get(key)
        if value is not None and not ok(value):
            raise PackageError(f"{path} has damaged metadata: {METADATA_PREFIX}{key} is "
                               f"{json.dumps(value)[:80]}, not {what}")
    if meta.get("labels") is not None:
        meta["labels"] = [x if isinstance(x, str) else json.dumps(x) for x in meta["labels"]]
    if meta.get("vocab_size") is not None:
        for t in ("pad", "cls", "sep", "mask"):
            if meta.get(f"{t}_token_id") is not None and meta[f"{t}_token_id"] >= meta["vocab_size"]:
                raise PackageError(f"{path} has damaged metadata: {t}_token_id {meta[f'{t}_token_id']} is past "
                                   f"its vocab_size {meta['vocab_size']}")
    return meta


def check_token_ids(seqs: list[list[int]], vocab_size: int | None, path, what=lambda i: f"text {i + 1}") -> None:
    """Token ids past the package's vocabulary are undefined behaviour on Core ML (a gather out of range):
    refused before running, naming the text and the id (a tokenizer that is not the model's)."""
    if not vocab_size:
        return
    for i, seq in enumerate(seqs):
        bad = [t for t in seq if not 0 <= t < vocab_size]
        if bad:
            raise UserError(f"{what(i)} has token id {bad[0]}, outside {path}'s vocabulary of {vocab_size}; "
                            f"is --tokenizer the model's own tokenizer?")


def input_lengths(path, function: str | None = None) -> list[int]:
    """The sequence lengths a package (function, or head of a `--shapes functions` package) accepts (enumerated
    shapes, one fixed shape, or one per function), ascending."""
    return sorted(length_functions(package_spec(path), function, path))


def length_functions(spec, function: str | None, path) -> dict[int, str]:
    """length -> the function that runs it, for `function` (see resolve_functions), ascending: the same function
    for every length of an enumerated-shapes package, one function per length for a `--shapes functions` one."""
    runs = {}
    for name in resolve_functions(spec, function, path)[1]:
        for inp in function_description(spec, name, path).input:
            if inp.name == "input_ids":
                arr = inp.type.multiArrayType
                shapes = [list(s.shape) for s in arr.enumeratedShapes.shapes] or [list(arr.shape)]
                runs.update({int(s[-1]): name for s in shapes if int(s[-1]) not in runs})
                break
        else:
            raise PackageError(f"{path} has no input_ids input")
    return dict(sorted(runs.items()))


def model_file(path) -> Path:
    """The package's model spec file (Manifest.json's root model item)."""
    path = Path(path)
    try:
        manifest = json.loads((path / "Manifest.json").read_text())
        items = {key: item["path"] for key, item in manifest["itemInfoEntries"].items()}
        name = items[manifest["rootModelIdentifier"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise PackageError(f"{path} has a damaged Manifest.json: {type(e).__name__}: {e}") from e
    try:
        for item in items.values():                           # Core ML reads every item: all stay inside
            confined(path / "Data", item, f"{path / 'Manifest.json'}: item path")
        return confined(path / "Data", name, f"{path / 'Manifest.json'}: item path")
    except CheckpointError as e:
        raise PackageError(str(e)) from e


def save_spec(path, spec) -> None:
    """Write an edited spec back into a package (its weights are untouched)."""
    model_file(path).write_bytes(spec.SerializeToString(deterministic=True))


def tokenizer_revision(meta: dict) -> str | None:
    """The hub revision a package's tokenizer is loaded at: the commit it was converted from when the tokenizer
    is the checkpoint's own (metadata "tokenizer" == "source"); None for a tokenizer named separately."""
    if meta.get("tokenizer") and meta.get("tokenizer") == meta.get("source"):
        return meta.get("revision")
    return None


def package_inputs(seqs: list[list[int]], length: int, pad_id: int) -> dict:
    """A package's inputs for token-id sequences: input_ids and attention_mask (1, length) int32, the texts
    one after the other, then padding.
    attention_mask is the text's segment id (1, 2, ...; just 1 for a single text) and 0 on padding."""
    total = sum(len(seq) for seq in seqs)
    if total > length:              # NumPy would broadcast a 1-token text into an empty slice: a silent drop
        raise ValueError(f"{total} tokens do not fit in length {length}")
    ids = np.full((1, length), pad_id, dtype=np.int32)
    mask = np.zeros((1, length), dtype=np.int32)
    start = 0
    for segment, seq in enumerate(seqs, start=1):
        ids[0, start:start + len(seq)] = seq
        mask[0, start:start + len(seq)] = segment
        start += len(seq)
    return {"input_ids": ids, "attention_mask": mask}


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise UserError(f"unknown backend '{backend}' (one of {', '.join(BACKENDS)})")
    on_mac = sys.platform == "darwin"
    if backend == "coreml" and not on_mac:
        raise UserError(f"--backend coreml needs macOS (Core ML prediction does not exist on {platform.system()}); "
                        f"use --backend emulate")
    if backend == "auto":
        return "coreml" if on_mac else "emulate"
    return backend


# ----------------------------------------------------------------------------- Core ML on macOS
# Every call into Core ML is in one function below: compile_package (compile to .mlmodelc), load_coreml (the
# one place a model is loaded), compute_plan_records (MLComputePlan). The rest runs, and is tested, on any OS.

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


NEURAL_ENGINE = "neural_engine"


def placement_summary(records: list[dict], op_flops: dict[str, int]) -> dict:
    """Aggregate compute-plan records (mlpackage.compute_plan_records) with per-op FLOPs (first output name ->
    FLOPs, package_cost.op_costs): the share of ops and of FLOPs on the Neural Engine, ops per device, and
    every op placed elsewhere grouped by type (count, FLOPs, devices, up to 3 op names)."""
    devices, fallbacks = {}, {}
    total_flops = sum(op_flops.get(r["name"], 0) for r in records)
    ne_ops = ne_flops = 0
    for r in records:
        device, flops = r["device"] or "unknown", op_flops.get(r["name"], 0)
        devices[device] = devices.get(device, 0) + 1
        if device == NEURAL_ENGINE:
            ne_ops, ne_flops = ne_ops + 1, ne_flops + flops
            continue
        group = fallbacks.setdefault(r["op_type"], {"count": 0, "flops": 0, "devices": {}, "examples": []})
        group["count"] += 1
        group["flops"] += flops
        group["devices"][device] = group["devices"].get(device, 0) + 1
        if len(group["examples"]) < 3:
            group["examples"].append(r["name"])
    return {"ops": len(records), "ops_by_device": dict(sorted(devices.items())),
            "neural_engine_op_share": ne_ops / len(records) if records else None,
            "neural_engine_flop_share": ne_flops / total_flops if total_flops else None,
            "fallbacks": dict(sorted(fallbacks.items(), key=lambda kv: (-kv[1]["count"], kv[0])))}


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def format_placement(units: str, summary: dict) -> str:
    """The placement summary in words: shares, then each fallback type."""
    devices = ", ".join(f"{d} {n}" for d, n in summary["ops_by_device"].items())
    lines = [f"{units}: {summary['ops']} ops ({devices}); on the Neural Engine: "
             f"{_pct(summary['neural_engine_op_share'])} of ops, {_pct(summary['neural_engine_flop_share'])} of FLOPs"]
    if not summary["fallbacks"]:
        lines.append("  every op on the Neural Engine")
    for op_type, g in summary["fallbacks"].items():
        where = ", ".join(f"{d} {n}" for d, n in sorted(g["devices"].items()))
        lines.append(f"  off the Neural Engine: {op_type} x{g['count']} ({where}; {g['flops'] / 1e9:.3g} GFLOP), "
                     f"e.g. {', '.join(g['examples'])}")
    return "\n".join(lines)


def per_op_flops(package, function: str | None, length: int) -> dict[str, int]:
    """op name (its first output, as in compute-plan records) -> FLOPs (coreml/cost.py), one function at `length`."""
    from modernbert_ane.coreml.cost import Program, op_costs                  # it imports this module
    program = Program(package, function)
    return {c.name: c.flops for c in op_costs(program, length)}


def describe_backend(backend: str, compute_units: str | None = None, load_report: dict | None = None) -> str:
    """The backend in words, for stderr: 'Core ML (cpu-and-ne, loaded from the cache in 0.4 s ...)'."""
    if backend == "coreml":
        return f"Core ML ({compute_units}, {describe_load(load_report)})"
    return "float16 emulator"


def describe_load(report: dict) -> str:
    """One line on how Core ML got the model, for stderr."""
    if report["cache"] == "off":
        return f"compiled and loaded in {report['load_s']:.1f} s (--no-cache)"
    if report["cache"] == "miss":
        return (f"compiled in {report['compile_s']:.1f} s into the cache, loaded in {report['load_s']:.1f} s "
                f"(hash {report['hash_s']:.1f} s)")
    return f"loaded from the cache in {report['load_s']:.1f} s (hash {report['hash_s']:.1f} s)"


class PackageRunner:
    """Loads a package once and runs it: Core ML on the Neural Engine (macOS) or the emulator. `function` may be
    a head of a `--shapes functions` package: each of its functions (one per length) is loaded, and `predict`
    runs the one of the input's length."""

    def __init__(self, path, backend: str = "auto", pessimistic: bool = False, function: str | None = None,
                 compute_units: str = DEFAULT_COMPUTE_UNITS, use_cache: bool = True):
        self.path, self.backend = Path(path), resolve_backend(backend)
        compute_unit(compute_units)                   # an unknown name: the same error on every OS
        spec = package_spec(self.path)                # the clear error for a missing or foreign path, first
        self.function = resolve_function(spec, function, self.path)
        self.functions = length_functions(spec, self.function, self.path)          # length -> function
        self.compute_units, self.load_report, self._models = compute_units, None, {}
        try:
            for name in dict.fromkeys(reversed(self.functions.values())):          # the largest length's first
                if self.backend == "coreml":
                    model, report = load_coreml(self.path, compute_units, name if spec.description.functions else None,
                                                use_cache)
                    self.load_report = self.load_report or report                  # the first load: the compile
                else:
                    from modernbert_ane.coreml.emulator import MLProgramEmulator
                    model = MLProgramEmulator(str(self.path), function_name=name, pessimistic=pessimistic)
                self._models[name] = model
        except NotImplementedError:                   # an op the emulator lacks: its own message
            raise
        except (OSError, ValueError, RuntimeError) as e:  # the weights: missing, truncated, damaged
            raise PackageError(f"cannot load {self.path} (damaged? e.g. a truncated weight.bin): "
                               f"{type(e).__name__}: {e}") from e

    def op_inputs(self) -> dict:
        """op name -> parameter -> names read, for the ops `predict(observe=)` reports (emulator only; every
        function's)."""
        if self.backend != "emulate":
            return {}
        return {op: read for model in self._models.values() for op, read in model.op_inputs.items()}

    def model_for(self, length: int):
        """The loaded function that runs `length` tokens: a clear error for a length the package does not take."""
        if length not in self.functions:
            raise UserError(f"{self.path} takes no input of {length} tokens (it takes "
                            f"{', '.join(map(str, self.functions))})")
        return self._models[self.functions[length]]

    def describe(self) -> str:
        return describe_backend(self.backend, self.compute_units, self.load_report)

    def predict(self, inputs: dict, observe=None) -> dict:
        """inputs: name -> int32 array. observe(op_name, op_type, value) sees every op (emulator only)."""
        inputs = {k: np.ascontiguousarray(v, dtype=np.int32) for k, v in inputs.items()}
        model = self.model_for(inputs["input_ids"].shape[-1])
        if self.backend == "coreml":
            outputs = model.predict(inputs)
        else:
            outputs = model.predict(inputs, observe=observe)
        return {k: np.asarray(v, dtype=np.float32) for k, v in outputs.items()}
