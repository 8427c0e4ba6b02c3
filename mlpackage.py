"""The packages this project writes: their metadata, and running them with Core ML or the emulator.

Knows nothing of ModernBERT's modules, only of what a package of ours declares about itself. Core ML
prediction exists on macOS only; `PackageRunner` is the one place that chooses between it and the
float16 emulator (`mlprogram_emulator.py`), so the macOS path stays thin.
"""
import json
import platform
import sys
from pathlib import Path

import numpy as np

from quiet_coremltools import import_coremltools
from user_errors import UserError

PROJECT_VERSION = "0.1.0"
METADATA_PREFIX = "modernbert_ane."
BACKENDS = ("auto", "coreml", "emulate")
# each task's output, as convert.py names it (and records it in the metadata's "output")
OUTPUT_NAMES = {"fill-mask": "logits", "encoder": "hidden_states", "classify": "logits", "token-classify": "logits",
                "embed": "embeddings"}


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


def resolve_function(spec, function: str | None, path) -> str:
    """`function`, or the package's default when None; a clear error for a function it does not have."""
    names = function_names(spec)
    function = function or names[0]
    if function not in names:
        raise PackageError(f"{path} has no function '{function}' (it has {', '.join(names)})")
    return function


def function_description(spec, function: str | None, path):
    """The description holding a function's inputs and outputs (the model's own for a single function)."""
    function = resolve_function(spec, function, path)
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
    function = resolve_function(spec, function, path)
    per_function = meta.pop("functions", None)
    if per_function is not None:
        if not isinstance(per_function, dict) or not isinstance(per_function.get(function), dict):
            raise PackageError(f"{path} has damaged {METADATA_PREFIX}functions metadata (no entry for '{function}')")
        meta.update(per_function[function])
    if "task" not in meta:
        raise PackageError(f"{path} has no task for function '{function}' in its metadata")
    meta["function"], meta["function_names"] = function, function_names(spec)
    return meta


def input_lengths(path, function: str | None = None) -> list[int]:
    """The sequence lengths a package (function) accepts (enumerated shapes, or one fixed shape), ascending."""
    spec = package_spec(path)
    for inp in function_description(spec, function, path).input:
        if inp.name == "input_ids":
            arr = inp.type.multiArrayType
            shapes = [list(s.shape) for s in arr.enumeratedShapes.shapes] or [list(arr.shape)]
            return sorted({int(s[-1]) for s in shapes})
    raise PackageError(f"{path} has no input_ids input")


def model_file(path) -> Path:
    """The package's model spec file (Manifest.json's root model item)."""
    path = Path(path)
    try:
        manifest = json.loads((path / "Manifest.json").read_text())
        item = manifest["itemInfoEntries"][manifest["rootModelIdentifier"]]
        return path / "Data" / item["path"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PackageError(f"{path} has a damaged Manifest.json: {type(e).__name__}: {e}") from e


def save_spec(path, spec) -> None:
    """Write an edited spec back into a package (its weights are untouched)."""
    model_file(path).write_bytes(spec.SerializeToString(deterministic=True))


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


class PackageRunner:
    """Loads a package once and runs it: Core ML on the Neural Engine (macOS) or the emulator."""

    def __init__(self, path, backend: str = "auto", pessimistic: bool = False, function: str | None = None):
        self.path, self.backend = Path(path), resolve_backend(backend)
        spec = package_spec(self.path)                # the clear error for a missing or foreign path, first
        self.function = resolve_function(spec, function, self.path)
        try:
            if self.backend == "coreml":
                ct = import_coremltools()
                named = {"function_name": self.function} if spec.description.functions else {}
                self._model = ct.models.MLModel(str(self.path), compute_units=ct.ComputeUnit.CPU_AND_NE, **named)
            else:
                from mlprogram_emulator import MLProgramEmulator
                self._model = MLProgramEmulator(str(self.path), function_name=self.function, pessimistic=pessimistic)
        except NotImplementedError:                   # an op the emulator lacks: its own message
            raise
        except (OSError, ValueError, RuntimeError) as e:  # the weights: missing, truncated, damaged
            raise PackageError(f"cannot load {self.path} (damaged? e.g. a truncated weight.bin): "
                               f"{type(e).__name__}: {e}") from e

    def op_inputs(self) -> dict:
        """op name -> parameter -> names read, for the ops `predict(observe=)` reports (emulator only)."""
        return self._model.op_inputs if self.backend == "emulate" else {}

    def predict(self, inputs: dict, observe=None) -> dict:
        """inputs: name -> int32 array. observe(op_name, op_type, value) sees every op (emulator only)."""
        inputs = {k: np.ascontiguousarray(v, dtype=np.int32) for k, v in inputs.items()}
        if self.backend == "coreml":
            outputs = self._model.predict(inputs)
        else:
            outputs = self._model.predict(inputs, observe=observe)
        return {k: np.asarray(v, dtype=np.float32) for k, v in outputs.items()}
