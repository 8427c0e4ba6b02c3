"""Find and read a ModernBERT checkpoint: a Hugging Face hub id or a local folder.

Reads `config.json`, the `.safetensors` weights (single file or sharded) and, for
sentence-transformers folders, `modules.json` to find the transformer inside. Knows file
layouts, not model structure: mapping weights onto modules is `model.py`'s job.
"""
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from user_errors import UserError

DEFAULT_MODEL = "answerdotai/ModernBERT-base"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a conversion needs from a hub repository; everything else (ONNX exports, pickles...) is skipped.
_HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "1_Pooling/*", "2_Dense/*", "3_Normalize/*"]
SENTENCE_TRANSFORMERS_TRANSFORMER = "sentence_transformers.models.Transformer"


class CheckpointError(UserError):
    """The checkpoint cannot be found, read or understood."""


@dataclass
class Checkpoint:
    source: str                 # what the user named: a hub id or a folder
    root: Path                  # the folder (for sentence-transformers: the one with modules.json)
    path: Path                  # the folder holding the transformer's config.json and weights
    config: dict                # config.json, parsed
    revision: str | None = None  # hub commit, when downloaded
    modules: list = field(default_factory=list)  # sentence-transformers modules.json entries, [] otherwise
    allow_pickle: bool = False  # pytorch_model.bin may be read (with weights_only=True) when no safetensors exist

    @property
    def is_sentence_transformers(self) -> bool:
        return bool(self.modules)


def resolve_checkpoint(name_or_path: str, revision: str | None = None, allow_pickle: bool = False) -> Checkpoint:
    """A local folder as is, or a hub id downloaded (or taken from the local hub cache)."""
    local = Path(name_or_path).expanduser()
    if local.exists():
        if not local.is_dir():
            raise CheckpointError(f"{name_or_path} is a file; expected a checkpoint folder (with config.json)")
        root, commit = local.resolve(), None
    elif is_hub_id(name_or_path):
        root, commit = _download(name_or_path, revision, allow_pickle)
    else:
        raise CheckpointError(f"no such checkpoint folder: {name_or_path}")
    modules = _read_modules(root)
    path = _transformer_folder(root, modules)
    return Checkpoint(source=name_or_path, root=root, path=path, config=read_config(path),
                      revision=commit, modules=modules, allow_pickle=allow_pickle)


def is_hub_id(name: str) -> bool:
    """Whether `name` reads as a hub repository id ("owner/name"), not as a local path."""
    return bool(_HUB_ID.match(name)) and not name.startswith((".", "/", "~"))


def _download(repo_id: str, revision: str | None, allow_pickle: bool) -> tuple[Path, str | None]:
    try:
        from huggingface_hub import snapshot_download
        patterns = _HUB_FILES + (["pytorch_model*.bin"] if allow_pickle else [])
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
    except Exception as e:  # offline, unreachable, unknown repo, gated...: all end the same way for the user
        reason = "the hub is offline or unreachable" if _looks_offline(e) else f"{type(e).__name__}: {e}"
        raise CheckpointError(f"cannot download '{repo_id}' from the Hugging Face hub ({reason}); "
                              f"pass a local checkpoint folder instead") from e
    folder = Path(folder)
    commit = folder.name if re.fullmatch(r"[0-9a-f]{40}", folder.name) else revision
    if not allow_pickle and not any(folder.rglob("*.safetensors")) and _hub_has_pickle(repo_id, commit):
        raise CheckpointError(f"'{repo_id}' has only pickle weights (pytorch_model.bin) at revision {commit or 'main'}, "
                              f"no .safetensors; pass --allow-pickle to load them safely (tensors only, "
                              f"torch.load(weights_only=True), no code runs), or convert a revision that has safetensors (--revision)")
    return folder, commit


def _hub_has_pickle(repo_id: str, revision: str | None) -> bool:
    """Whether the hub repository holds a pytorch_model.bin at `revision` (False when that cannot be asked)."""
    try:
        from huggingface_hub import list_repo_files
        return any(Path(f).name.startswith("pytorch_model") and f.endswith(".bin")
                   for f in list_repo_files(repo_id, revision=revision))
    except Exception:  # offline: the generic "no .safetensors weights" error follows
        return False


def _looks_offline(e: Exception) -> bool:
    text = f"{type(e).__name__} {e}".lower()
    return os.environ.get("HF_HUB_OFFLINE") == "1" or any(
        w in text for w in ("offline", "connect", "resolve", "network", "timed out", "localentrynotfound"))


def _read_modules(root: Path) -> list:
    modules_file = root / "modules.json"
    if not modules_file.is_file():
        return []
    modules = read_json(modules_file)
    if not isinstance(modules, list):
        raise CheckpointError(f"{modules_file} is not a sentence-transformers modules list")
    return modules


def _transformer_folder(root: Path, modules: list) -> Path:
    if not modules:
        return root
    for module in modules:
        if module.get("type") == SENTENCE_TRANSFORMERS_TRANSFORMER:
            return root / module.get("path", "")
    raise CheckpointError(f"{root / 'modules.json'} has no {SENTENCE_TRANSFORMERS_TRANSFORMER} module")


def read_config(folder: Path) -> dict:
    config_file = folder / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{folder} has no config.json; is it a checkpoint folder?")
    config = read_json(config_file)                  # a folder or an unreadable file: "cannot read"
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file} is not a JSON object; is it a model's config.json?")
    model_type = config.get("model_type")
    if model_type != "modernbert":
        raise CheckpointError(f"{config_file} describes a '{model_type}' model; only 'modernbert' is supported")
    return config


def read_json(path: Path):
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from e
    except OSError as e:
        raise CheckpointError(f"cannot read {path} ({e.strerror or e})") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"cannot read {path}: not valid JSON ({e})") from e


def weight_files(folder: Path, allow_pickle: bool = False) -> list[Path]:
    """The safetensors files of a checkpoint, in shard order (or its pickle file, when allowed)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise CheckpointError(f"{index} names missing shard(s): {', '.join(missing)}")
        return [folder / s for s in shards]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    others = sorted(folder.glob("*.safetensors"))
    if others:
        return others
    if (folder / "pytorch_model.bin").exists():
        if allow_pickle:
            return [folder / "pytorch_model.bin"]
        raise CheckpointError(f"{folder} has only pickle weights (pytorch_model.bin); pass --allow-pickle to read "
                              f"them (tensors only, weights_only=True) or save the checkpoint as safetensors")
    raise CheckpointError(f"{folder} has no .safetensors weights")


def _damaged_weights(file: Path, e: Exception) -> CheckpointError:
    return CheckpointError(f"cannot read weights from {file} (truncated or damaged, or a pickle holding more "
                           f"than tensors?): {e}")


def check_weight_files(folder: Path, allow_pickle: bool = False) -> list[Path]:
    """weight_files(), each safetensors header read (cheap: no tensor is loaded), so that a truncated or
    damaged file is a CheckpointError before another library reads it."""
    from safetensors import SafetensorError, safe_open
    files = weight_files(folder, allow_pickle)
    for file in files:
        if file.suffix == ".safetensors":
            try:
                with safe_open(str(file), framework="pt"):
                    pass
            except (SafetensorError, OSError, ValueError, RuntimeError) as e:
                raise _damaged_weights(file, e) from e
    return files


def load_state_dict(folder: Path, allow_pickle: bool = False) -> dict:
    """All tensors of the checkpoint's weight files, by their stored names. A pickle file is read only when
    allowed, and then with torch.load(weights_only=True): tensors, never code."""
    import pickle
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    tensors = {}
    for file in weight_files(folder, allow_pickle):
        try:
            if file.suffix == ".bin":
                tensors.update(torch.load(file, map_location="cpu", weights_only=True))
                continue
            tensors.update(load_file(str(file)))
        except (SafetensorError, OSError, ValueError, RuntimeError, pickle.UnpicklingError, EOFError) as e:
            raise _damaged_weights(file, e) from e
    return tensors
