"""Find and read a ModernBERT checkpoint: a Hugging Face hub id or a local folder.

Reads `config.json`, the `.safetensors` weights (single file or sharded) and, for
sentence-transformers folders, `modules.json` to find the transformer inside. Knows file
layouts, not model structure: mapping weights onto modules is `model.py`'s job.

Hostile folders are refused in one line before anything large is read or allocated: every path named
inside the folder (modules.json, shard names) stays inside it, symlinks included; only regular files are
opened; config.json is checked by type and range and its sizes against the safetensors headers; the memory
the weights need is estimated against the machine's; non-finite weights are refused with their name.
"""
import json
import math
import os
import re
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from modernbert_ane.user_errors import UserError

DEFAULT_MODEL = "answerdotai/ModernBERT-base"
# the small ModernBERT this project trained itself (bench/train_reference.py): the offline alternative
BUNDLED_MODEL = Path(__file__).resolve().parents[1] / "tests" / "data" / "reference"   # in a checkout
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

    def input_paths(self) -> list[Path]:
        """Every folder this checkpoint is read from (no output may be or hold one of them)."""
        return [self.root, self.path] + [self.root / m.get("path", "") for m in self.modules]

    def module_folder(self, module: dict) -> Path:
        """The folder of a modules.json entry, confined to the checkpoint."""
        return confined(self.root, module.get("path", ""), f"{self.root / 'modules.json'}: module path")


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
    config = read_config(path)
    check_sizes(config, path, allow_pickle)
    return Checkpoint(source=name_or_path, root=root, path=path, config=config,
                      revision=commit, modules=modules, allow_pickle=allow_pickle)


def is_hub_id(name: str) -> bool:
    """Whether `name` reads as a hub repository id ("owner/name"), not as a local path."""
    return bool(_HUB_ID.match(name)) and not name.startswith((".", "/", "~"))


def display_path(path: Path) -> str:
    """`path` as the user would type it here: relative to the working folder when under it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _download(repo_id: str, revision: str | None, allow_pickle: bool) -> tuple[Path, str | None]:
    try:
        from huggingface_hub import snapshot_download
        patterns = _HUB_FILES + (["pytorch_model*.bin"] if allow_pickle else [])
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
    except Exception as e:  # offline, unreachable, unknown repo, gated...: all end the same way for the user
        reason = "the hub is offline or unreachable" if _looks_offline(e) else f"{type(e).__name__}: {e}"
        bundled = f", e.g. the bundled trained model {display_path(BUNDLED_MODEL)}" if BUNDLED_MODEL.is_dir() else ""
        raise CheckpointError(f"cannot download '{repo_id}' from the Hugging Face hub ({reason}); "
                              f"pass a local checkpoint folder instead{bundled}") from e
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


# ----------------------------------------------------------------------------- confinement

def confinement_root(folder: Path) -> Path:
    """The folder symlinks inside `folder` may point into: the folder itself, or for a hub cache snapshot
    (snapshots/<commit>/, files linked into ../../blobs/) the repository's cache folder."""
    folder = Path(folder).resolve()
    if folder.parent.name == "snapshots" and (folder.parent.parent / "blobs").is_dir():
        return folder.parent.parent
    return folder


def confined(folder: Path, name, what: str) -> Path:
    """`folder / name` for a path named inside an input (a shard name, a module path, a manifest item):
    refused in one line when it is absolute, climbs out with `..`, or resolves (symlinks followed) outside
    the folder."""
    if not isinstance(name, str):
        raise CheckpointError(f"{what} {json.dumps(name)} is not a path")
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts or re.match(r"^[A-Za-z]:", name):
        raise CheckpointError(f"{what} '{name}' leaves {folder}; paths inside an input must stay inside it")
    path = Path(folder) / name
    if not path.resolve().is_relative_to(confinement_root(folder)):
        raise CheckpointError(f"{what} '{name}' is a link that leaves {folder} (to {path.resolve()}); "
                              f"paths inside an input must stay inside it")
    return path


def check_regular(path: Path) -> Path:
    """A file about to be opened for reading: a FIFO or device would block or never end, a folder is no file.
    Refused before it is opened."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError as e:
        raise CheckpointError(f"cannot read {path} (no such file)") from e
    except OSError as e:
        raise CheckpointError(f"cannot read {path} ({e.strerror or e})") from e
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO, device or socket"
        raise CheckpointError(f"cannot read {path}: it is {kind}, not a regular file")
    return path


def check_files(folder: Path, names) -> None:
    """Those of `names` present in `folder` (links or not): confined to it and regular files. For the files
    other libraries open (transformers' tokenizer files), checked before they are handed over."""
    for name in names:
        path = Path(folder) / name
        if os.path.lexists(path):
            check_regular(confined(folder, name, f"{folder}:"))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "config.json",
                   "chat_template.jinja", "chat_template.json")


def load_tokenizer(source: str, tasks=(), revision: str | None = None):
    """A tokenizer (hub id or folder) with what ModernBERT needs: [CLS], [SEP] and [PAD] ([MASK] too when
    `tasks` has fill-mask), put around every text as [CLS] ... [SEP]; a one-line error otherwise.
    `revision`: the hub commit (or branch, tag) of a hub id; None: its main branch."""
    import transformers
    transformers.utils.logging.set_verbosity_error()      # no "sequence longer than model_max_length" chatter
    name = str(source)
    if not Path(name).expanduser().exists() and ("/" in name or name.startswith(("~", "."))) and not is_hub_id(name):
        raise CheckpointError(f"no such tokenizer folder: {name}; pass --tokenizer with the model's tokenizer "
                              f"(a hub id or folder)")
    if Path(name).expanduser().is_dir():
        check_files(Path(name).expanduser(), TOKENIZER_FILES)       # confined, regular: before transformers opens them
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(name, **({"revision": revision} if revision else {}))
    except Exception as e:
        if isinstance(e, UnicodeDecodeError) and Path(name).is_dir():
            for file in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
                if (Path(name) / file).is_file():
                    read_json(Path(name) / file)                # names the file that is not UTF-8
        reason = " ".join(str(e).split())[:200]
        raise CheckpointError(f"cannot load a tokenizer from '{source}' ({type(e).__name__}: {reason}); "
                              f"pass --tokenizer with a hub id or folder that has the model's tokenizer") from e
    needed = ["cls_token", "sep_token", "pad_token"] + (["mask_token"] if "fill-mask" in tasks else [])
    missing = [t for t in needed if getattr(tokenizer, t, None) is None]
    if missing:
        why = " (a fill-mask package needs it)" if missing == ["mask_token"] else ""
        raise CheckpointError(f"the tokenizer from {source} has no {', '.join(missing)}{why}; "
                              f"use the model's own tokenizer")
    ids = tokenizer("a")["input_ids"]
    if not ids or ids[0] != tokenizer.cls_token_id or ids[-1] != tokenizer.sep_token_id:
        raise CheckpointError(f"the tokenizer from {source} does not put [CLS] and [SEP] around a text "
                              f"({tokenizer.cls_token} ... {tokenizer.sep_token}), as ModernBERT expects; "
                              f"use the model's own tokenizer")
    return tokenizer


# ----------------------------------------------------------------------------- sentence-transformers

def _read_modules(root: Path) -> list:
    modules_file = root / "modules.json"
    if not os.path.lexists(modules_file):
        return []
    modules = read_json(confined(root, "modules.json", f"{root}:"))
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise CheckpointError(f"{modules_file} is not a sentence-transformers modules list")
    for module in modules:                      # a module's folder may be absent (Normalize has no files)
        confined(root, module.get("path", ""), f"{modules_file}: module path")
    return modules


def _transformer_folder(root: Path, modules: list) -> Path:
    if not modules:
        return root
    for module in modules:
        if module.get("type") == SENTENCE_TRANSFORMERS_TRANSFORMER:
            return confined(root, module.get("path", ""), f"{root / 'modules.json'}: module path")
    raise CheckpointError(f"{root / 'modules.json'} has no {SENTENCE_TRANSFORMERS_TRANSFORMER} module")


ST_MODULES = "sentence_transformers.models."
ST_POOLING = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean"}


@dataclass
class SentenceModules:
    """What a sentence-transformers folder does after the transformer, parsed once (model.py builds its head
    from it, evaluation.py computes the float32 reference from it)."""
    pooling: str                # "cls" or "mean"
    dense: list = field(default_factory=list)   # per Dense module: (weight (out, in), bias or None, activation name)
    normalize: bool = False


def sentence_modules(ckpt: "Checkpoint") -> SentenceModules:
    """The Pooling, Dense and Normalize modules of a sentence-transformers folder, in order; a plain checkpoint
    pools by its config's classifier_pooling."""
    if not ckpt.is_sentence_transformers:
        return SentenceModules(ckpt.config.get("classifier_pooling", "cls"))
    pooling, dense, normalize = None, [], False
    for module in sorted(ckpt.modules, key=lambda m: int(m.get("idx", 0))):
        kind, folder = module.get("type", ""), ckpt.module_folder(module)
        if kind == SENTENCE_TRANSFORMERS_TRANSFORMER:
            continue
        if kind == ST_MODULES + "Pooling":
            cfg = read_json(folder / "config.json")
            modes = [ST_POOLING.get(k, k) for k, v in cfg.items() if k.startswith("pooling_mode") and v]
            if len(modes) != 1 or modes[0] not in ("cls", "mean") or cfg.get("include_prompt") is False:
                raise CheckpointError(f"{folder}: pooling {modes} is not supported (cls or mean, one mode)")
            pooling = modes[0]
        elif kind == ST_MODULES + "Dense":
            cfg = read_json(folder / "config.json")
            act = cfg.get("activation_function", "torch.nn.modules.activation.Tanh").rsplit(".", 1)[-1]
            tensors = load_state_dict(folder)
            bias = tensors["linear.bias"].float() if cfg.get("bias", True) else None
            dense.append((tensors["linear.weight"].float(), bias, act))
        elif kind == ST_MODULES + "Normalize":
            normalize = True
        else:
            raise CheckpointError(f"sentence-transformers module {kind} is not supported")
    if pooling is None:
        raise CheckpointError(f"{ckpt.root / 'modules.json'} has no Pooling module")
    return SentenceModules(pooling, dense, normalize)


def read_prompts(root: Path) -> dict | None:
    """sentence-transformers prompts (name -> text put before the input, e.g. "search_query: ") from
    config_sentence_transformers.json, or None; "default" names the default prompt when there is one."""
    file = Path(root) / "config_sentence_transformers.json"
    if not os.path.lexists(file):
        return None
    data = read_json(confined(root, file.name, f"{root}:"))
    prompts = data.get("prompts") if isinstance(data, dict) else None
    if not prompts:
        return None
    if not isinstance(prompts, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()):
        raise CheckpointError(f"{file}: prompts must map names to texts")
    default = data.get("default_prompt_name")
    if default is not None and default not in prompts:
        raise CheckpointError(f"{file}: default_prompt_name '{default}' is not one of its prompts")
    return {"prompts": dict(sorted(prompts.items())), "default": default}


# ----------------------------------------------------------------------------- config.json

def read_config(folder: Path) -> dict:
    config_file = folder / "config.json"
    if not os.path.lexists(config_file):
        raise CheckpointError(f"{folder} has no config.json; is it a checkpoint folder?")
    config = read_json(confined(folder, "config.json", f"{folder}:"))   # a folder or an unreadable file: "cannot read"
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file} is not a JSON object; is it a model's config.json?")
    model_type = config.get("model_type")
    if model_type != "modernbert":
        raise CheckpointError(f"{config_file} describes a '{model_type}' model; only 'modernbert' is supported")
    validate_config(config, config_file)
    return config


# (key, smallest value): integers config.json must hold when present (JSON integers, not 768.0 or "768")
CONFIG_INTEGERS = {"vocab_size": 1, "hidden_size": 1, "intermediate_size": 1, "num_hidden_layers": 1,
                   "num_attention_heads": 1, "max_position_embeddings": 2, "local_attention": 2,
                   "global_attn_every_n_layers": 1, "num_labels": 1, "pad_token_id": 0, "cls_token_id": 0,
                   "sep_token_id": 0, "mask_token_id": 0}
CONFIG_FLOATS = ("norm_eps", "global_rope_theta", "local_rope_theta")        # positive, finite
CONFIG_BOOLS = ("norm_bias", "attention_bias", "mlp_bias", "decoder_bias", "classifier_bias")
CONFIG_STRINGS = ("hidden_activation", "classifier_activation", "classifier_pooling")
LAYER_TYPES = ("full_attention", "sliding_attention")


def validate_config(config: dict, where) -> None:
    """Types and ranges of what model.ModernBertConfig reads, before anything is built from it: sizes are
    positive JSON integers, heads divide the hidden size into even halves (RoPE), the local window holds at
    least two tokens, id2label keys are 0..n-1, layer_types names every layer."""
    def bad(key, why):
        raise CheckpointError(f"{where}: {key} {json.dumps(config[key])[:80]} {why}")

    for key, low in CONFIG_INTEGERS.items():
        if config.get(key) is not None and (type(config[key]) is not int or config[key] < low):
            bad(key, f"must be an integer >= {low}")
    for key in CONFIG_FLOATS:
        v = config.get(key)
        if v is not None and (type(v) not in (int, float) or not math.isfinite(v) or v <= 0):
            bad(key, "must be a positive number")
    for key in CONFIG_BOOLS:
        if config.get(key) is not None and type(config[key]) is not bool:
            bad(key, "must be true or false")
    for key in CONFIG_STRINGS:
        if config.get(key) is not None and not isinstance(config[key], str):
            bad(key, "must be a name")
    hidden, heads = config.get("hidden_size", 768), config.get("num_attention_heads", 12)
    if hidden % heads or (hidden // heads) % 2:
        raise CheckpointError(f"{where}: hidden_size {hidden} does not split into {heads} heads of even size "
                              f"(RoPE rotates pairs of channels)")
    layers = config.get("num_hidden_layers", 22)
    layer_types = config.get("layer_types")
    if layer_types is not None and (not isinstance(layer_types, list) or len(layer_types) != layers
                                    or any(t not in LAYER_TYPES for t in layer_types)):
        raise CheckpointError(f"{where}: layer_types must list {layers} entries, each full_attention or "
                              f"sliding_attention")
    rope = config.get("rope_parameters")
    if rope is not None and not (isinstance(rope, dict) and all(isinstance(v, dict) for v in rope.values())):
        raise CheckpointError(f"{where}: rope_parameters must map layer types to their parameters")
    id2label = config.get("id2label")
    if id2label is not None and not isinstance(id2label, dict):
        raise CheckpointError(f"{where}: id2label must be an object")
    if id2label is not None:
        if set(id2label) != {str(i) for i in range(len(id2label))}:
            raise CheckpointError(f"{where}: id2label keys must be 0..n-1 (got {', '.join(list(id2label)[:6])})")
        if isinstance(config.get("num_labels"), int) and id2label and config["num_labels"] != len(id2label):
            raise CheckpointError(f"{where}: num_labels {config['num_labels']} but id2label has {len(id2label)} labels")


# ----------------------------------------------------------------------------- files

def read_json(path: Path):
    check_regular(path)
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
    if os.path.lexists(index):
        weight_map = read_json(confined(folder, index.name, f"{folder}:"))
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index} has no weight_map of tensor names to shard files")
        shards = sorted(set(weight_map.values()))
        paths = [confined(folder, s, f"{index}: shard") for s in shards]
        missing = [s for s, p in zip(shards, paths) if not p.exists()]
        if missing:
            raise CheckpointError(f"{index} names missing shard(s): {', '.join(missing)}")
        return [check_regular(p) for p in paths]
    single = folder / "model.safetensors"
    if os.path.lexists(single):
        return [check_regular(confined(folder, single.name, f"{folder}:"))]
    others = sorted(folder.glob("*.safetensors"))
    if others:
        return [check_regular(confined(folder, p.name, f"{folder}:")) for p in others]
    if (folder / "pytorch_model.bin").exists():
        if allow_pickle:
            return [check_regular(confined(folder, "pytorch_model.bin", f"{folder}:"))]
        raise CheckpointError(f"{folder} has only pickle weights (pytorch_model.bin); pass --allow-pickle to read "
                              f"them (tensors only, weights_only=True) or save the checkpoint as safetensors")
    raise CheckpointError(f"{folder} has no .safetensors weights")


def _damaged_weights(file: Path, e: Exception) -> CheckpointError:
    return CheckpointError(f"cannot read weights from {file} (truncated or damaged, or a pickle holding more "
                           f"than tensors?): {e}")


HEADER_LIMIT = 100 << 20             # safetensors' own limit on a header's size


def safetensors_header(file: Path) -> dict:
    """name -> {"dtype", "shape", "data_offsets"} from a safetensors file's header, read alone (8 bytes of
    length, then JSON): no tensor is loaded. A header that claims more than the file holds is damaged."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < n <= min(HEADER_LIMIT, size - 8):
                raise ValueError(f"header length {n} does not fit the file's {size} bytes")
            header = json.loads(f.read(n))
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        end = max([int(v["data_offsets"][1]) for v in tensors.values()] + [0])
        if 8 + n + end > size:
            raise ValueError(f"the header places tensors up to byte {8 + n + end}, the file has {size}")
        for v in tensors.values():
            if not all(type(d) is int and d >= 0 for d in v["shape"]):
                raise ValueError(f"a tensor shape {v['shape']} is not a list of sizes")
        return tensors
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, struct.error) as e:
        raise _damaged_weights(file, e) from e


def _shape_of(headers: dict, suffix: str):
    return next((v["shape"] for k, v in headers.items() if k == suffix or k.endswith("." + suffix)), None)


def check_sizes(config: dict, folder: Path, allow_pickle: bool = False) -> None:
    """config.json's sizes against the safetensors headers, before any model is built from them (a config
    claiming 10^9 layers must not allocate them), then the memory the weights need against the machine's."""
    files = weight_files(folder, allow_pickle)
    headers = {}
    for file in files:
        if file.suffix == ".safetensors":
            headers.update(safetensors_header(file))
    where = f"{folder / 'config.json'} does not match the weights in {folder}"
    if headers:
        layer_ids = {int(m.group(1)) for k in headers for m in [re.search(r"(?:^|\.)layers\.(\d+)\.", k)] if m}
        n_layers = config.get("num_hidden_layers", 22)
        if layer_ids and max(layer_ids) + 1 != n_layers:
            raise CheckpointError(f"{where}: num_hidden_layers {n_layers}, weights for {max(layer_ids) + 1} layers")
        C, V = config.get("hidden_size", 768), config.get("vocab_size", 50368)
        inter = config.get("intermediate_size", 1152)
        for suffix, expected, names in (("embeddings.tok_embeddings.weight", [V, C], "vocab_size x hidden_size"),
                                        ("layers.0.attn.Wqkv.weight", [3 * C, C], "3 hidden_size x hidden_size"),
                                        ("layers.0.mlp.Wi.weight", [2 * inter, C],
                                         "2 intermediate_size x hidden_size")):
            shape = _shape_of(headers, suffix)
            if shape is not None and list(shape) != expected:
                raise CheckpointError(f"{where}: {suffix} is {' x '.join(map(str, shape))}, config.json says "
                                      f"{names} = {' x '.join(map(str, expected))}")
    check_memory(folder, sum(_numel(v["shape"]) for v in headers.values()) if headers else None, files)


def _numel(shape) -> int:
    return math.prod(int(d) for d in shape)


BYTES_PER_PARAMETER = 8                  # the float32 model, and the loaded tensors (float32 at most) beside it


def memory_bytes() -> int | None:
    """This machine's physical memory, or None where it cannot be read."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(folder: Path, parameters: int | None, files: list[Path]) -> None:
    """Refuse, with an estimate, a checkpoint whose weights cannot fit in this machine's memory (a pickle
    is estimated from its size)."""
    if parameters is None:
        parameters = sum(f.stat().st_size for f in files) // 2         # float16 pickles: the smaller guess
    need, have = parameters * BYTES_PER_PARAMETER, memory_bytes()
    if have is not None and need > have:
        raise CheckpointError(f"{folder} has {parameters:,} parameters: loading them needs about "
                              f"{need / 2**30:.1f} GiB ({BYTES_PER_PARAMETER} bytes each: the float32 model and "
                              f"the loaded weights), more than this machine's {have / 2**30:.1f} GiB")


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
    check_finite(tensors, folder)
    return tensors


def check_finite(tensors: dict, folder: Path) -> None:
    """A NaN or infinity in a weight spreads through every token: refused at load, with the tensor's name."""
    import torch
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"weight {name} in {folder} holds non-finite values (NaN or infinity); "
                                  f"the checkpoint is damaged")


def check_rotation(kind: str, config: dict) -> None:
    """A Hadamard rotation needs a Hadamard matrix of the hidden size: said before any work, with the
    alternatives (rotations/hadamard.py knows which orders it can build)."""
    from modernbert_ane.rotations.hadamard import NoHadamardConstructionError, describe_construction
    if kind != "hadamard":
        return
    try:
        describe_construction(config.get("hidden_size", 768))
    except NoHadamardConstructionError as e:
        raise CheckpointError(f"--rotation hadamard: {e}, or --rotation none") from e
