"""The packages this project writes: their metadata, and running them with Core ML or the emulator.

Knows nothing of ModernBERT's modules, only of what a package of ours declares about itself. Core ML
prediction exists on macOS only; `run_package` is the one place that chooses between it and the
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
    ct = import_coremltools()
    try:
        return ct.utils.load_spec(str(path))
    except Exception as e:
        raise PackageError(f"cannot read {path} as a Core ML package (damaged?): {type(e).__name__}: {e}") from e


def write_metadata(mlmodel, metadata: dict) -> None:
    """Store our metadata, every value JSON-encoded (sorted, so the same options give the same bytes)."""
    for key in sorted(metadata):
        value = metadata[key]
        if value is None:
            continue
        mlmodel.user_defined_metadata[METADATA_PREFIX + key] = json.dumps(value, sort_keys=True)   # typed on read


def read_metadata(path) -> dict:
    """Our metadata of a package, values parsed back from JSON."""
    spec = package_spec(path)
    raw = dict(spec.description.metadata.userDefined)
    ours = {k[len(METADATA_PREFIX):]: v for k, v in raw.items() if k.startswith(METADATA_PREFIX)}
    if "task" not in ours:
        raise PackageError(f"{path} was not written by this project's convert.py (no {METADATA_PREFIX}task metadata)")
    try:
        return {key: json.loads(value) for key, value in ours.items()}
    except json.JSONDecodeError as e:
        raise PackageError(f"{path} has damaged {METADATA_PREFIX}* metadata: {e}") from e


def input_lengths(path) -> list[int]:
    """The sequence lengths a package accepts (enumerated shapes, or its one fixed shape), ascending."""
    spec = package_spec(path)
    for inp in spec.description.input:
        if inp.name == "input_ids":
            arr = inp.type.multiArrayType
            shapes = [list(s.shape) for s in arr.enumeratedShapes.shapes] or [list(arr.shape)]
            return sorted({int(s[-1]) for s in shapes})
    raise PackageError(f"{path} has no input_ids input")


def package_inputs(seqs: list[list[int]], length: int, pad_id: int) -> dict:
    """A package's inputs for token-id sequences: input_ids and attention_mask (1, length) int32, the texts
    one after the other, then padding.
    attention_mask is the text's segment id (1, 2, ...; just 1 for a single text) and 0 on padding."""
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

    def __init__(self, path, backend: str = "auto", pessimistic: bool = False):
        self.path, self.backend = Path(path), resolve_backend(backend)
        package_spec(self.path)                       # the clear error for a missing or foreign path, first
        if self.backend == "coreml":
            ct = import_coremltools()
            self._model = ct.models.MLModel(str(self.path), compute_units=ct.ComputeUnit.CPU_AND_NE)
        else:
            from mlprogram_emulator import MLProgramEmulator
            self._model = MLProgramEmulator(str(self.path), pessimistic=pessimistic)

    def predict(self, inputs: dict, observe=None) -> dict:
        """inputs: name -> int32 array. observe(op_name, op_type, value) sees every op (emulator only)."""
        inputs = {k: np.ascontiguousarray(v, dtype=np.int32) for k, v in inputs.items()}
        if self.backend == "coreml":
            outputs = self._model.predict(inputs)
        else:
            outputs = self._model.predict(inputs, observe=observe)
        return {k: np.asarray(v, dtype=np.float32) for k, v in outputs.items()}
