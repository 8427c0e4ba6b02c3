"""The packages this project writes, read: `Package` parses one package once (its spec, straight from the files)
and answers everything about it: its functions, the sequence lengths each accepts, our metadata.

Knows nothing of ModernBERT's modules, only of what a package of ours declares about itself. Running a package is
coreml/runner.py; Core ML on macOS is coreml/macos.py.
"""
import json
import os
import stat
from pathlib import Path

import numpy as np

from modernbert_ane.checkpoint import CheckpointError, confined
from modernbert_ane.coreml.quiet_coremltools import import_coremltools
from modernbert_ane.user_errors import UserError

METADATA_PREFIX = "modernbert_ane."


class PackageError(UserError):
    """A path that is not a readable .mlpackage written by this project."""


class Package:
    """One .mlpackage, its spec parsed once, here; predict, the diff scripts, the runner and the emulator all read
    this object, so a run parses a package one time. `function` arguments name a function, or in a `--shapes
    functions` package a head (fill_mask) naming its functions of every length (fill_mask_128, ...); None is
    the package's default function, or the head it belongs to."""

    def __init__(self, path):
        self.path = Path(path)
        self.spec_file = spec_file(self.path)
        self.spec = parse_spec(self.path, self.spec_file)

    @classmethod
    def of(cls, package) -> "Package":
        """`package` when it is a Package already, else the package at that path, read now."""
        return package if isinstance(package, cls) else cls(package)

    def __str__(self) -> str:
        return str(self.path)

    # ---- functions and lengths

    @property
    def function_names(self) -> list[str]:
        """The package's functions, the default first: ["main"] for a single-function package."""
        names = [f.name for f in self.spec.description.functions]
        if not names:
            return ["main"]
        default = self.spec.description.defaultFunctionName or names[0]
        return [default] + [n for n in names if n != default]

    def heads(self) -> dict[str, list[str]]:
        """A package converted with `--shapes functions`: head (the task's name, fill_mask) -> its functions, one
        per length (fill_mask_128, fill_mask_512), from the metadata's per-function "head"; {} for any other."""
        stored = self.spec.description.metadata.userDefined.get(METADATA_PREFIX + "functions")
        if not stored:
            return {}
        try:
            functions = json.loads(stored)
        except json.JSONDecodeError as e:
            raise PackageError(f"{self.path} has damaged {METADATA_PREFIX}functions metadata: {e}") from e
        heads = {}
        for name in self.function_names:
            entry = functions.get(name) if isinstance(functions, dict) else None
            if isinstance(entry, dict) and _is_name(entry.get("head")):
                heads.setdefault(entry["head"], []).append(name)
        return heads

    def resolve(self, function: str | None = None) -> tuple[str, list[str]]:
        """(the name `function` resolves to, the package's functions that serve it); a clear error for a name
        the package does not have."""
        names, heads = self.function_names, self.heads()
        if function is None:
            function = next((head for head, served in heads.items() if names[0] in served), names[0])
        if function in heads:
            return function, heads[function]
        if function not in names:
            raise PackageError(f"{self.path} has no function '{function}' (it has {', '.join([*heads, *names])})")
        return function, [function]

    def description(self, function: str | None = None):
        """The description holding a function's inputs and outputs (the model's own for a single function; a
        head's first function's)."""
        function = self.resolve(function)[1][0]
        if not self.spec.description.functions:
            return self.spec.description
        return next(f for f in self.spec.description.functions if f.name == function)

    def length_functions(self, function: str | None = None) -> dict[int, str]:
        """length -> the function that runs it, ascending: the same function for every length of an
        enumerated-shapes package, one function per length for a `--shapes functions` one."""
        runs = {}
        for name in self.resolve(function)[1]:
            for inp in self.description(name).input:
                if inp.name == "input_ids":
                    arr = inp.type.multiArrayType
                    shapes = [list(s.shape) for s in arr.enumeratedShapes.shapes] or [list(arr.shape)]
                    runs.update({int(s[-1]): name for s in shapes if int(s[-1]) not in runs})
                    break
            else:
                raise PackageError(f"{self.path} has no input_ids input")
        return dict(sorted(runs.items()))

    def lengths(self, function: str | None = None) -> list[int]:
        """The sequence lengths a function (or head) accepts (enumerated shapes, one fixed shape, or one per
        function), ascending."""
        return list(self.length_functions(function))

    # ---- our metadata

    def metadata(self, function: str | None = None) -> dict:
        """Our metadata, values parsed back from JSON and checked, for one function (or head). A multi-function
        package keeps what differs per function (task, output, labels...) under "functions"; the function's
        entries are merged in. Added: "function" (its name), "function_names" (the package's) and
        "length_functions" (length -> function; {} without an input_ids input)."""
        raw = dict(self.spec.description.metadata.userDefined)
        ours = {k[len(METADATA_PREFIX):]: v for k, v in raw.items() if k.startswith(METADATA_PREFIX)}
        if "task" not in ours and "functions" not in ours:
            raise PackageError(f"{self.path} was not written by this project's convert.py (no "
                               f"{METADATA_PREFIX}task metadata)")
        try:
            meta = {key: json.loads(value) for key, value in ours.items()}
        except json.JSONDecodeError as e:
            raise PackageError(f"{self.path} has damaged {METADATA_PREFIX}* metadata: {e}") from e
        function, served = self.resolve(function)
        per_function = meta.pop("functions", None)
        if per_function is not None:
            if not isinstance(per_function, dict) or not all(isinstance(per_function.get(f), dict) for f in served):
                raise PackageError(f"{self.path} has damaged {METADATA_PREFIX}functions metadata (no entry for "
                                   f"'{function}')")
            meta.update(per_function[served[0]])
            if len(served) > 1:                         # a head: every length's function, its costs by length
                meta["seq_lengths"] = sorted(n for f in served for n in per_function[f].get("seq_lengths") or [])
                meta["cost"] = {k: v for f in served for k, v in (per_function[f].get("cost") or {}).items()}
        if "task" not in meta:
            raise PackageError(f"{self.path} has no task for function '{function}' in its metadata")
        meta = check_metadata(meta, self.path)
        meta["function"], meta["function_names"] = function, self.function_names
        try:
            meta["length_functions"] = self.length_functions(function)
        except PackageError:            # no input_ids: Package.lengths says so where the lengths are needed
            meta["length_functions"] = {}
        return meta

    def write_metadata(self, metadata: dict) -> None:
        """Store our metadata in the spec (call save() to write it), every value JSON-encoded, sorted, so the
        same options give the same bytes."""
        stored = self.spec.description.metadata.userDefined
        for key in [k for k in stored if k.startswith(METADATA_PREFIX)]:
            del stored[key]
        for key in sorted(metadata):
            if metadata[key] is not None:
                stored[METADATA_PREFIX + key] = json.dumps(metadata[key], sort_keys=True)   # typed on read

    def save(self) -> None:
        """Write the edited spec back into the package (its weights are untouched)."""
        self.spec_file.write_bytes(self.spec.SerializeToString(deterministic=True))


def read_metadata(path, function: str | None = None) -> dict:
    """Package(path).metadata(function): for a caller that wants nothing else of the package."""
    return Package(path).metadata(function)


def written_by_convert(path) -> bool:
    """Whether `path` is a package a previous convert.py wrote (what `convert.py --force` may replace)."""
    try:
        stored = Package(path).spec.description.metadata.userDefined
    except UserError:
        return False
    return any(k.startswith(METADATA_PREFIX) for k in stored)


def spec_file(path: Path) -> Path:
    """The package's model spec file, after checking it is a package whose files all stay inside it."""
    if not path.exists():
        raise PackageError(f"no such package: {path}")
    if not path.is_dir() or not (path / "Manifest.json").is_file():
        raise PackageError(f"{path} is not an .mlpackage (no Manifest.json)")
    check_package_files(path)
    return model_file(path)


def parse_spec(path: Path, file: Path):
    """The protobuf spec in `file`; a clear error for a damaged one."""
    import_coremltools()
    from coremltools.proto import Model_pb2
    # The file is read directly: coremltools' load_spec opens a package read-write and rewrites its
    # Manifest.json, so that merely reading a package would change it.
    spec = Model_pb2.Model()
    try:
        spec.ParseFromString(file.read_bytes())
    except OSError as e:
        raise PackageError(f"cannot read {path}: {file.relative_to(path)}: {e.strerror or e}") from e
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


def model_file(path) -> Path:
    """The package's model spec file (Manifest.json's root model item)."""
    from modernbert_ane.coreml.emulator.loader import manifest_items     # the one reader of Manifest.json
    path = Path(path)
    try:
        name, items = manifest_items(str(path))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise PackageError(f"{path} has a damaged Manifest.json: {type(e).__name__}: {e}") from e
    try:
        for item in items:                                    # Core ML reads every item: all stay inside
            confined(path / "Data", item, f"{path / 'Manifest.json'}: item path")
        return confined(path / "Data", name, f"{path / 'Manifest.json'}: item path")
    except CheckpointError as e:
        raise PackageError(str(e)) from e


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
    "mlp_rotation": (lambda v: isinstance(v, dict) and _is_name(v.get("kind")) and _is_int(v.get("block"), 1)
                     and _is_int(v.get("seed"), 0), "an MLP rotation (kind, block, seed)"),
    "w8a8_float16_inputs": (lambda v: isinstance(v, list) and bool(v) and all(_is_name(x) for x in v),
                            "a list of conv names"),
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


