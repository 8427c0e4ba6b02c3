"""Hostile inputs, every CLI: one line on stderr, a non-zero exit, no traceback, nothing written.

A table of cases (CLI, argv, exit code, expected words) feeds convert.py, predict.py, diff_torch.py and
diff_coreml.py bad input as a user would: missing, unreadable, foreign or damaged checkpoints, packages,
tokenizers and text files; text too long, empty or not UTF-8; outputs inside the input or already there;
a full disk. Issue 14's classes: outputs that are symlinks, devices, FIFOs or sockets, --force over what is
not ours, outputs holding an input or inside any input (tokenizer, the checkpoint a package names), an
unwritable or full folder found before the work; paths inside inputs that leave them (manifest items,
shard names, module paths, symlinks) and special files where a file is read; config.json lying about
types and sizes (checked before allocation), non-finite weights, a hidden size without a Hadamard
matrix; package metadata of the wrong type, token ids outside the package's vocabulary. Each case checks the exit code, that stderr holds exactly one line, the `error:` line with the
expected words (a full disk, found after the work started, may follow the CLI's progress lines), no
traceback, and that no file in the
inputs, the case's folder (its working directory and outputs) or its TMPDIR was created, changed or
deleted (paths, types, modes, sizes, mtimes, content hashes).

Speed: a fresh `python convert.py` pays 3-6 s of imports (torch, transformers, coremltools): ~90 of them
would take minutes on two cores. Most cases therefore run in a process forked from a launcher, a plain
Python process (not pytest) that imported those libraries once: the child sets its working directory,
stdin, stdout and stderr and runs the script as `python SCRIPT ARGV` does (runpy, `__main__`; the
project's own modules are imported by the child; the interpreter's teardown is skipped, after the
atexit handlers and a garbage collection). Cases marked `fresh` run as `python SCRIPT ARGV` in
background threads while the forked ones run: the full disks (the file-size limit is set before the
script starts) and one case per CLI that imports everything the CLI imports, so that import-time
output on stderr is checked too.
"""
import errno
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest

from modernbert_ane.user_errors import EXIT_USER_ERROR, UserError, writing

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = {cli: ROOT / f"{cli}.py" for cli in ("convert", "predict", "diff_torch", "diff_coreml")}
SEQ_LEN = 32
CONVERT = ["--seq-len", str(SEQ_LEN), "--skip-check"]
SHORT = "the capital of france is [MASK]."
TOO_LONG = "[MASK] " + " ".join(["the river rises in the hills north of the town"] * 6)     # > 32 tokens
CASE_TIMEOUT = 120
AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0       # chmod 000 does not stop root from reading


# ----------------------------------------------------------------------------- the processes

LAUNCHER = r'''
import json
import os
import sys
import time
root = sys.argv[1]
requests, replies = os.fdopen(os.dup(0), "rb", buffering=0), os.dup(1)
sys.path.insert(0, root)
from modernbert_ane.coreml.quiet_coremltools import import_coremltools            # the libraries, imported once
import_coremltools()
import coremltools.converters.mil
import coremltools.optimize.coreml
import coremltools.proto.Model_pb2
import numpy
import torch
import safetensors.torch
import tokenizers
import transformers
for name in ("AutoTokenizer", "PreTrainedTokenizerFast", "ModernBertModel", "ModernBertForMaskedLM"):
    getattr(transformers, name)
for name, module in list(sys.modules.items()):               # the project's modules: each child imports them
    if os.path.abspath(getattr(module, "__file__", None) or "/").startswith(root + os.sep):
        del sys.modules[name]
sys.path.remove(root)
import gc
gc.freeze()                                                  # children collect only what they made themselves


def wait(pid, timeout):
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            return "timeout"
        time.sleep(0.005)


def child(request):
    """Become `python SCRIPT ARGV`: exit as it would (the exit code; a traceback for an uncaught exception)."""
    requests.close()
    os.close(replies)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    import tempfile
    tempfile.tempdir = None                                  # TMPDIR is read again
    for fd, path, flags in ((0, request["stdin"], os.O_RDONLY),
                            (1, request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                            (2, request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
        new = os.open(path, flags, 0o644)
        os.dup2(new, fd)
        os.close(new)
    sys.argv = [request["script"], *request["argv"]]
    sys.path.insert(0, os.path.dirname(request["script"]))
    import atexit
    import runpy
    try:
        runpy.run_path(request["script"], run_name="__main__")
        code = 0
    except SystemExit as e:                                  # what the interpreter does with them
        code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    import gc
    gc.collect()                                             # finalizers (temporary folders) run, as at exit
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)                                           # skips tearing down the libraries' modules (seconds)


while True:
    line = requests.readline()
    if not line:
        break
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        child(request)
    os.write(replies, (json.dumps({"rc": wait(pid, request["timeout"])}) + "\n").encode())
'''

# `python SCRIPT ARGV` with writes limited to `fsize` bytes (RLIMIT_FSIZE; SIGXFSZ ignored, so a write
# past it fails with EFBIG as on a full disk). Set in the process itself: preexec_fn is unsafe in threads.
LIMITED = r'''
import os
import resource
import runpy
import signal
import sys
limit = int(sys.argv.pop(1))
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
sys.argv.pop(0)
sys.path[0] = os.path.dirname(sys.argv[0])
runpy.run_path(sys.argv[0], run_name="__main__")
'''


@dataclass
class Result:
    code: int | str
    stdout: str
    stderr: str


class Launcher:
    """Runs `python SCRIPT ARGV` as processes forked from one that imported the heavy libraries once."""

    def __init__(self, io_dir: Path, env: dict):
        self.io_dir, self.env, self.count, self.lock = io_dir, env, 0, threading.Lock()
        self.log = open(io_dir / "launcher.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(ROOT)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, cwd=io_dir, env=env)

    def run(self, script: Path, argv: list[str], cwd: Path, stdin: Path | None, env: dict) -> Result:
        with self.lock:
            self.count += 1
            out, err = self.io_dir / f"{self.count}.out", self.io_dir / f"{self.count}.err"
            request = {"script": str(script), "argv": argv, "cwd": str(cwd), "env": {**self.env, **env},
                       "stdin": str(stdin or os.devnull), "stdout": str(out), "stderr": str(err),
                       "timeout": CASE_TIMEOUT}
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.proc.stdin.flush()
            reply = self.proc.stdout.readline()
            assert reply, f"the launcher died: {(self.io_dir / 'launcher.log').read_text()[-3000:]}"
            return Result(json.loads(reply)["rc"], out.read_text(errors="replace"), err.read_text(errors="replace"))

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self.log.close()


def run_fresh(script: Path, argv: list[str], cwd: Path, stdin: Path | None, env: dict, fsize: int | None) -> Result:
    prefix = [sys.executable, "-c", LIMITED, str(fsize)] if fsize else [sys.executable]
    with open(stdin or os.devnull, "rb") as stdin_file:
        try:
            r = subprocess.run([*prefix, str(script), *argv], cwd=cwd, stdin=stdin_file, capture_output=True,
                               env=env, timeout=CASE_TIMEOUT)
        except subprocess.TimeoutExpired as e:
            return Result("timeout", (e.stdout or b"").decode(errors="replace"),
                          (e.stderr or b"").decode(errors="replace"))
    return Result(r.returncode, r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace"))


# ----------------------------------------------------------------------------- snapshots

_digests: dict = {}


def _digest(path: Path, st: os.stat_result):
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _digests:
        try:
            _digests[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        except PermissionError:                                  # a chmod-000 input (not as root)
            _digests[key] = "unreadable"
    return _digests[key]


def snapshot(*roots: Path) -> dict:
    """Every entry under `roots`: (kind, mode, size, mtime, sha256) of files, link targets, kinds of the rest.
    A folder's own mtime is left out: a temporary file created and removed again is no leftover."""
    state = {}
    for root in roots:
        for folder, dirs, files in os.walk(root):
            for name in dirs + files:
                path = Path(folder, name)
                st = path.lstat()
                if stat.S_ISREG(st.st_mode):
                    state[path] = ("file", st.st_mode, st.st_size, st.st_mtime_ns, _digest(path, st))
                elif stat.S_ISLNK(st.st_mode):
                    state[path] = ("link", os.readlink(path))
                else:
                    state[path] = ("dir" if stat.S_ISDIR(st.st_mode) else "other", st.st_mode)
    return state


def changes(before: dict, after: dict) -> list[str]:
    return ([f"created {p}" for p in sorted(after.keys() - before.keys())] +
            [f"deleted {p}" for p in sorted(before.keys() - after.keys())] +
            [f"changed {p}: {before[p]} -> {after[p]}" for p in sorted(before.keys() & after.keys())
             if before[p] != after[p]])


# ----------------------------------------------------------------------------- the hostile inputs

def copy_checkpoint(source: Path, folder: Path) -> Path:
    shutil.copytree(source, folder)
    return folder


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def make_unreadable(path: Path) -> None:
    """chmod 000 where that stops reading; as root (it does not), a folder where the file should be."""
    if AS_ROOT:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
        path.mkdir()
        (path / "not-a-file").write_text("")
    else:
        path.chmod(0)


def edit_weights(folder: Path, edit) -> None:
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def latin1_json(path: Path) -> None:
    """The same JSON with one string in latin-1: not UTF-8."""
    text = path.read_text()
    path.write_bytes(text.replace("{", '{"note": "caf\xe9", ', 1).encode("latin-1", errors="replace"))


def strip_special_tokens(folder: Path, declare: bool) -> None:
    """A tokenizer without [CLS] [SEP] [PAD] [MASK]: gone from the vocabulary, the added tokens and the
    [CLS] ... [SEP] template; `declare` keeps their names in tokenizer_config.json (transformers then adds
    them as new tokens, and nothing puts [CLS] and [SEP] around a text)."""
    gone = {"[CLS]", "[SEP]", "[PAD]", "[MASK]"}

    def tokenizer_json(t):
        t["added_tokens"] = [a for a in t["added_tokens"] if a["content"] not in gone]
        t["post_processor"] = None
        t["model"]["vocab"] = {k: v for k, v in t["model"]["vocab"].items() if k not in gone}
    edit_json(folder / "tokenizer.json", tokenizer_json)
    if not declare:
        edit_json(folder / "tokenizer_config.json",
                  lambda c: [c.pop(k, None) for k in ("cls_token", "sep_token", "pad_token", "mask_token")])


def tokenizer_folder(checkpoint: Path, folder: Path) -> Path:
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (checkpoint / name).exists():
            shutil.copy(checkpoint / name, folder / name)
    return folder


def set_package_metadata(package: Path, **values) -> None:
    from modernbert_ane.coreml.package import METADATA_PREFIX, Package
    package = Package(package)
    for key, value in values.items():
        package.spec.description.metadata.userDefined[METADATA_PREFIX + key] = json.dumps(value)
    package.save()


def build_inputs(folder: Path, good_checkpoint: Path) -> SimpleNamespace:
    """Everything but the packages: checkpoints, tokenizers, text files."""
    i = SimpleNamespace(root=folder)
    folder.mkdir()
    i.ckpt = copy_checkpoint(good_checkpoint, folder / "ckpt")
    i.ckpt_bert = copy_checkpoint(i.ckpt, folder / "ckpt-bert")
    edit_json(i.ckpt_bert / "config.json", lambda c: c.update(model_type="bert"))
    i.ckpt_truncated = copy_checkpoint(i.ckpt, folder / "ckpt-truncated")
    truncate(i.ckpt_truncated / "model.safetensors")
    i.ckpt_shapes = copy_checkpoint(i.ckpt, folder / "ckpt-shapes")
    edit_weights(i.ckpt_shapes, lambda t: t.update({"model.layers.1.mlp.Wo.weight":
                                                      t["model.layers.1.mlp.Wo.weight"][:, :48].contiguous()}))
    i.ckpt_missing = copy_checkpoint(i.ckpt, folder / "ckpt-missing-keys")
    edit_weights(i.ckpt_missing, lambda t: t.pop("model.layers.2.attn.Wqkv.weight"))
    i.ckpt_pickle = copy_checkpoint(i.ckpt, folder / "ckpt-pickle")
    import torch
    from safetensors.torch import load_file
    torch.save(load_file(str(i.ckpt_pickle / "model.safetensors")), i.ckpt_pickle / "pytorch_model.bin")
    (i.ckpt_pickle / "model.safetensors").unlink()
    i.ckpt_config_latin1 = copy_checkpoint(i.ckpt, folder / "ckpt-config-latin1")
    latin1_json(i.ckpt_config_latin1 / "config.json")
    i.ckpt_config_empty = copy_checkpoint(i.ckpt, folder / "ckpt-config-empty")
    (i.ckpt_config_empty / "config.json").write_bytes(b"")
    i.ckpt_config_list = copy_checkpoint(i.ckpt, folder / "ckpt-config-list")
    (i.ckpt_config_list / "config.json").write_text("[]\n")
    i.ckpt_config_unreadable = copy_checkpoint(i.ckpt, folder / "ckpt-config-unreadable")
    make_unreadable(i.ckpt_config_unreadable / "config.json")
    i.ckpt_tokenizer_latin1 = copy_checkpoint(i.ckpt, folder / "ckpt-tokenizer-latin1")
    latin1_json(i.ckpt_tokenizer_latin1 / "tokenizer.json")
    i.ckpt_no_special = copy_checkpoint(i.ckpt, folder / "ckpt-no-special-tokens")
    strip_special_tokens(i.ckpt_no_special, declare=False)
    i.tok_stripped = tokenizer_folder(i.ckpt, folder / "tok-stripped")
    strip_special_tokens(i.tok_stripped, declare=False)
    i.tok_declared = tokenizer_folder(i.ckpt, folder / "tok-declared")
    strip_special_tokens(i.tok_declared, declare=True)
    i.tok_no_mask = tokenizer_folder(i.ckpt, folder / "tok-no-mask")
    edit_json(i.tok_no_mask / "tokenizer_config.json", lambda c: c.pop("mask_token"))
    i.tok_latin1 = tokenizer_folder(i.ckpt, folder / "tok-latin1")
    latin1_json(i.tok_latin1 / "tokenizer.json")
    i.empty_dir = folder / "empty"
    i.empty_dir.mkdir()
    i.a_file = folder / "a-file.txt"
    i.a_file.write_text("not a checkpoint\n")
    i.dangling = folder / "dangling-link"
    i.dangling.symlink_to(folder / "nowhere")
    i.pkg_empty = folder / "empty.mlpackage"
    i.pkg_empty.mkdir()
    i.pkg_file = folder / "file.mlpackage"
    i.pkg_file.write_text("not a package\n")

    i.texts_latin1 = folder / "texts-latin1.txt"
    i.texts_latin1.write_bytes(f"{SHORT}\ncaf\xe9 [MASK]\n".encode("latin-1"))
    i.texts_empty = folder / "texts-empty.txt"
    i.texts_empty.write_bytes(b"")
    i.texts_blank = folder / "texts-blank.txt"
    i.texts_blank.write_text("\n   \n\t\n")
    i.texts_unreadable = folder / "texts-unreadable.txt"
    i.texts_unreadable.write_text(f"{SHORT}\n")
    make_unreadable(i.texts_unreadable)
    i.texts_fifo = folder / "texts.fifo"
    os.mkfifo(i.texts_fifo)
    build_confinement_inputs(folder, i)
    build_config_inputs(folder, i)
    return i


def replace_with_fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def replace_with_link(path: Path, target: Path) -> None:
    path.unlink()
    path.symlink_to(target)


def modules_json(folder: Path, transformer_path: str, pooling_path: str) -> None:
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": transformer_path, "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": pooling_path, "type": "sentence_transformers.models.Pooling"}]))


def build_confinement_inputs(folder: Path, i: SimpleNamespace) -> None:
    """Inputs naming paths outside themselves (absolute, `..`, symlinks out) and special files where a
    file is expected (each would hang or read another file if opened)."""
    i.tok_good = tokenizer_folder(i.ckpt, folder / "tok-good")
    i.tok_fifo = tokenizer_folder(i.ckpt, folder / "tok-fifo")
    replace_with_fifo(i.tok_fifo / "tokenizer.json")
    i.tok_link_out = tokenizer_folder(i.ckpt, folder / "tok-link-out")
    replace_with_link(i.tok_link_out / "tokenizer.json", i.tok_good / "tokenizer.json")
    i.ckpt_config_fifo = copy_checkpoint(i.ckpt, folder / "ckpt-config-fifo")
    replace_with_fifo(i.ckpt_config_fifo / "config.json")
    i.ckpt_weights_fifo = copy_checkpoint(i.ckpt, folder / "ckpt-weights-fifo")
    replace_with_fifo(i.ckpt_weights_fifo / "model.safetensors")
    i.ckpt_weights_link = copy_checkpoint(i.ckpt, folder / "ckpt-weights-link")
    replace_with_link(i.ckpt_weights_link / "model.safetensors", Path("..", "ckpt", "model.safetensors"))
    for name, shard in (("dotdot", "../ckpt/model.safetensors"), ("absolute", str(i.ckpt / "model.safetensors"))):
        ckpt = copy_checkpoint(i.ckpt, folder / f"ckpt-shard-{name}")
        (ckpt / "model.safetensors").unlink()
        (ckpt / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {"model.embeddings.tok_embeddings.weight": shard}}))
        setattr(i, f"ckpt_shard_{name}", ckpt)
    for name, transformer, pooling in (("module-absolute", "", "/etc"), ("module-dotdot", "", "../ckpt"),
                                       ("transformer-dotdot", "../ckpt", "1_Pooling")):
        ckpt = copy_checkpoint(i.ckpt, folder / f"st-{name}")
        modules_json(ckpt, transformer, pooling)
        setattr(i, "st_" + name.replace("-", "_"), ckpt)


def build_config_inputs(folder: Path, i: SimpleNamespace) -> None:
    """config.json lying about sizes and types (checked before anything is allocated), non-finite weights."""
    import torch
    edits = {
        "layers_1e9": lambda c: (c.update(num_hidden_layers=10 ** 9), c.pop("layer_types")),
        "vocab_6e7": lambda c: c.update(vocab_size=60_000_000),
        "hidden_float": lambda c: c.update(hidden_size=64.0),
        "heads_negative": lambda c: c.update(num_attention_heads=-4),
        "heads_5": lambda c: c.update(num_attention_heads=5),
        "window_1": lambda c: c.update(local_attention=1),
        "activation": lambda c: c.update(hidden_activation="tanhh"),
        "id2label_gap": lambda c: c.update(id2label={"0": "a", "5": "b"}),
        "layer_types_string": lambda c: c.update(layer_types="full_attention"),
    }
    for name, edit in edits.items():
        ckpt = copy_checkpoint(i.ckpt, folder / f"ckpt-{name.replace('_', '-')}")
        edit_json(ckpt / "config.json", edit)
        setattr(i, f"ckpt_{name}", ckpt)
    i.ckpt_nan = copy_checkpoint(i.ckpt, folder / "ckpt-nan")
    edit_weights(i.ckpt_nan, lambda t: t["model.layers.1.mlp.Wo.weight"].__setitem__((0, 0), float("nan")))
    i.ckpt_inf = copy_checkpoint(i.ckpt, folder / "ckpt-inf")
    edit_weights(i.ckpt_inf, lambda t: t["model.embeddings.tok_embeddings.weight"].__setitem__((3, 1), float("inf")))
    from checkpoints import build_checkpoint                     # hidden 92: no Hadamard matrix of that order
    build_checkpoint(folder / "ckpt-hidden-92", "tiny", config_overrides=dict(hidden_size=92, num_attention_heads=2))
    i.ckpt_hidden_92 = folder / "ckpt-hidden-92"
    torch.manual_seed(0)


def build_packages(folder: Path, i: SimpleNamespace, launcher: Launcher, env: dict) -> None:
    """The packages (in their own folder: the first fresh cases run while they are built): ours, converted
    from the good checkpoint, a foreign one, damaged and unreadable copies, one whose checkpoint moved."""
    folder.mkdir()
    i.packages = folder
    i.pkg = folder / "pkg.mlpackage"
    built = launcher.run(SCRIPTS["convert"], [str(i.ckpt), *CONVERT, "-o", str(i.pkg)], folder, None, env)
    assert built.code == 0, built.stderr[-3000:]
    from test_predict import foreign_packages                  # a valid ML Program without our metadata
    i.pkg_foreign = foreign_packages(folder)["foreign"]
    shutil.rmtree(folder / "future.mlpackage")
    copies = {}
    for name in ("manifest", "mlmodel", "weights", "unreadable", "moved"):
        copies[name] = folder / f"pkg-{name}.mlpackage"
        shutil.copytree(i.pkg, copies[name])
    i.pkg_manifest, i.pkg_mlmodel, i.pkg_weights = copies["manifest"], copies["mlmodel"], copies["weights"]
    i.pkg_unreadable, i.pkg_moved = copies["unreadable"], copies["moved"]
    model_file = Path("Data", "com.apple.CoreML", "model.mlmodel")
    truncate(i.pkg_manifest / "Manifest.json")
    truncate(i.pkg_mlmodel / model_file)
    truncate(i.pkg_weights / "Data" / "com.apple.CoreML" / "weights" / "weight.bin")
    make_unreadable(i.pkg_unreadable / model_file)
    set_package_metadata(i.pkg_moved, source=str(i.root / "moved-away"), tokenizer=str(i.root / "moved-away"))
    weights = Path("Data", "com.apple.CoreML", "weights", "weight.bin")
    for name in ("manifest-escape", "weights-link", "weights-fifo", "labels-bad", "vocab-bad", "lengths-bad",
                 "prompts-bad"):
        copies[name] = folder / f"pkg-{name}.mlpackage"
        shutil.copytree(i.pkg, copies[name])
        setattr(i, "pkg_" + name.replace("-", "_"), copies[name])
    edit_json(i.pkg_manifest_escape / "Manifest.json", lambda m: [
        item.update(path="../../ckpt/config.json") for item in m["itemInfoEntries"].values()
        if item["path"].endswith("model.mlmodel")])
    replace_with_link(i.pkg_weights_link / weights, i.pkg / weights)
    replace_with_fifo(i.pkg_weights_fifo / weights)
    set_package_metadata(i.pkg_labels_bad, labels="negative,positive")
    set_package_metadata(i.pkg_vocab_bad, vocab_size="big")
    set_package_metadata(i.pkg_lengths_bad, seq_lengths=[-1])
    set_package_metadata(i.pkg_prompts_bad, prompts={"prompts": ["query"]})


# ----------------------------------------------------------------------------- the table

@dataclass(frozen=True)
class Case:
    id: str
    cli: str
    argv: Callable                 # (inputs, case folder) -> argv
    message: tuple                 # words the error line must contain
    code: int = EXIT_USER_ERROR
    stdin: bytes | None = None     # None: /dev/null
    setup: Callable | None = None  # (inputs, case folder): what the case folder holds before the run
    fsize: int | None = None       # writes past this many bytes fail (EFBIG), as on a full disk
    fresh: bool = False            # `python SCRIPT` instead of a fork of the launcher
    late: bool = False             # fails after the work started: progress lines may come before the error line


def out_package(d):
    return d / "out.mlpackage"


def out_json(d):
    return d / "m.json"


def existing_package(i, d):
    out_package(d).mkdir()
    (out_package(d) / "marker").write_text("mine")


def existing_file(path_of):
    def setup(i, d):
        path_of(d).write_text('{"mine": true}\n')
    return setup


def folder_at(path_of):
    def setup(i, d):
        path_of(d).mkdir()
    return setup


def resolve(parts, i, d) -> list:
    return [part(i, d) if callable(part) else part for part in parts]


def words(message) -> tuple:
    return message if isinstance(message, tuple) else (message,)


def convert(case_id, model, message, *extra, **options):
    """convert.py MODEL --seq-len 32 --skip-check -o CASE/out.mlpackage EXTRA."""
    parts = [model, *CONVERT, "-o", lambda i, d: out_package(d), *extra]
    return Case(f"convert-{case_id}", "convert", lambda i, d: resolve(parts, i, d), words(message), **options)


def predict(case_id, argv, message, **options):
    """predict.py ARGV (ARGV built from the inputs and the case folder)."""
    return Case(f"predict-{case_id}", "predict", argv, words(message), **options)


def diff_torch(case_id, model, message, *extra, json_at=lambda i, d: out_json(d), **options):
    """diff_torch.py MODEL --max-length 32 [--json CASE/m.json] EXTRA."""
    parts = [model, "--max-length", str(SEQ_LEN), *(["--json", json_at] if json_at else []), *extra]
    return Case(f"diff_torch-{case_id}", "diff_torch", lambda i, d: resolve(parts, i, d), words(message), **options)


def diff_coreml(case_id, package, message, *extra, json_at=lambda i, d: out_json(d), **options):
    """diff_coreml.py PACKAGE [--json CASE/m.json] EXTRA."""
    parts = [package, *(["--json", json_at] if json_at else []), *extra]
    return Case(f"diff_coreml-{case_id}", "diff_coreml", lambda i, d: resolve(parts, i, d), words(message),
                **options)


def report_at(i, d):
    return d / "report"


def at(name):
    """The input named `name`."""
    return lambda i, d: getattr(i, name)


def missing(i, d):
    return i.root / "no-such-thing"


UNREADABLE = "cannot read"
DAMAGED = "damaged"
NOT_OURS = "was not written by this project's convert.py"
NO_SPECIAL = ("tokenizer", "has no cls_token, sep_token, pad_token")
NOT_WRAPPING = ("tokenizer", "does not put [CLS] and [SEP] around a text")
NO_SPACE = "no space left to write"
NOT_UTF8_TOKENIZER = ("tokenizer.json", "is not UTF-8")

CASES = [
    # ---- convert.py
    convert("missing", missing, "no such checkpoint folder", fresh=True),
    convert("dangling-symlink", at("dangling"), "no such checkpoint folder"),
    convert("unreadable-config", at("ckpt_config_unreadable"), (UNREADABLE, "config.json")),
    convert("a-file", at("a_file"), "is a file; expected a checkpoint folder"),
    convert("empty-folder", at("empty_dir"), "has no config.json"),
    convert("a-package", at("pkg"), "has no config.json"),
    convert("other-model-type", at("ckpt_bert"), "describes a 'bert' model; only 'modernbert' is supported"),
    convert("config-not-utf8", at("ckpt_config_latin1"), ("config.json", "is not UTF-8")),
    convert("config-not-an-object", at("ckpt_config_list"), ("config.json", "is not a JSON object")),
    convert("config-empty", at("ckpt_config_empty"), ("config.json", "not valid JSON")),
    convert("truncated-weights", at("ckpt_truncated"), ("model.safetensors", "truncated or damaged")),
    convert("mismatched-shapes", at("ckpt_shapes"), ("model.layers.1.mlp.Wo.weight", "has shape")),
    convert("missing-keys", at("ckpt_missing"), ("do not match", "model.layers.2.attn.Wqkv.weight")),
    convert("pickle-only", at("ckpt_pickle"), ("pytorch_model.bin", "--allow-pickle")),
    convert("tokenizer-without-special-tokens", at("ckpt"), NO_SPECIAL, "--tokenizer", at("tok_stripped")),
    convert("tokenizer-declaring-absent-tokens", at("ckpt"), NOT_WRAPPING, "--tokenizer", at("tok_declared")),
    convert("tokenizer-without-mask", at("ckpt"), ("tokenizer", "mask_token", "fill-mask"),
            "--tokenizer", at("tok_no_mask")),
    convert("tokenizer-not-utf8", at("ckpt_tokenizer_latin1"), NOT_UTF8_TOKENIZER),
    convert("tokenizer-missing", at("ckpt"), ("no such tokenizer folder", "--tokenizer"), "--tokenizer", missing),
    Case("convert-output-inside-checkpoint", "convert",
         lambda i, d: [i.ckpt, *CONVERT, "-o", i.ckpt / "x.mlpackage"], ("is inside the input",)),
    convert("existing-output", at("ckpt"), ("exists", "--force"), setup=existing_package),
    convert("existing-output-file", at("ckpt"), ("exists", "--force"), setup=existing_file(out_package)),
    convert("disk-full", at("ckpt"), NO_SPACE, fsize=64 * 1024, fresh=True, late=True),

    # ---- predict.py
    predict("missing", lambda i, d: [missing(i, d), SHORT], "no such package"),
    predict("a-file", lambda i, d: [i.pkg_file, SHORT], "is not an .mlpackage"),
    predict("a-checkpoint", lambda i, d: [i.ckpt, SHORT], "is not an .mlpackage"),
    predict("empty-folder", lambda i, d: [i.pkg_empty, SHORT], "is not an .mlpackage"),
    predict("unreadable", lambda i, d: [i.pkg_unreadable, SHORT], (UNREADABLE, "pkg-unreadable.mlpackage")),
    predict("not-ours", lambda i, d: [i.pkg_foreign, SHORT], NOT_OURS),
    predict("truncated-manifest", lambda i, d: [i.pkg_manifest, SHORT], DAMAGED),
    predict("truncated-model", lambda i, d: [i.pkg_mlmodel, SHORT], DAMAGED),
    predict("truncated-weights", lambda i, d: [i.pkg_weights, SHORT], (DAMAGED, "pkg-weights.mlpackage")),
    predict("tokenizer-moved", lambda i, d: [i.pkg_moved, SHORT], ("no such tokenizer folder", "moved-away",
                                                                  "--tokenizer")),
    predict("tokenizer-without-special-tokens", lambda i, d: [i.pkg, SHORT, "--tokenizer", i.tok_stripped],
            NO_SPECIAL),
    predict("tokenizer-declaring-absent-tokens", lambda i, d: [i.pkg, SHORT, "--tokenizer", i.tok_declared],
            NOT_WRAPPING),
    predict("tokenizer-not-utf8", lambda i, d: [i.pkg, SHORT, "--tokenizer", i.tok_latin1], NOT_UTF8_TOKENIZER),
    predict("too-long", lambda i, d: [i.pkg, TOO_LONG], ("text 1 is", "too many for the package's largest length 32",
                                                         "--truncate"), fresh=True),
    predict("no-texts", lambda i, d: [i.pkg], "no texts"),
    predict("empty-file", lambda i, d: [i.pkg, "--file", i.texts_empty], "no texts"),
    predict("blank-file", lambda i, d: [i.pkg, "--file", i.texts_blank], "no texts"),
    predict("empty-stdin", lambda i, d: [i.pkg, "-"], "no texts", stdin=b""),
    predict("blank-stdin", lambda i, d: [i.pkg], "no texts", stdin=b"  \n\n\t\n"),
    predict("blank-text", lambda i, d: [i.pkg, SHORT, "   "], "text 2 is empty"),
    predict("file-not-utf8", lambda i, d: [i.pkg, "--file", i.texts_latin1], ("texts-latin1.txt", "is not UTF-8")),
    predict("stdin-not-utf8", lambda i, d: [i.pkg, "-"], ("stdin is not UTF-8",),
            stdin=f"{SHORT}\ncaf\xe9 [MASK]\n".encode("latin-1")),
    predict("file-missing", lambda i, d: [i.pkg, "--file", missing(i, d)], "no such file"),
    predict("file-unreadable", lambda i, d: [i.pkg, "--file", i.texts_unreadable],
            (UNREADABLE, "texts-unreadable.txt")),
    predict("file-is-a-fifo", lambda i, d: [i.pkg, "--file", i.texts_fifo], (UNREADABLE, "not a regular file")),

    # ---- diff_torch.py
    diff_torch("missing", missing, "no such checkpoint folder"),
    diff_torch("unreadable-config", at("ckpt_config_unreadable"), (UNREADABLE, "config.json")),
    diff_torch("a-file", at("a_file"), "is a file; expected a checkpoint folder"),
    diff_torch("empty-folder", at("empty_dir"), "has no config.json"),
    diff_torch("other-model-type", at("ckpt_bert"), "only 'modernbert' is supported"),
    diff_torch("config-not-utf8", at("ckpt_config_latin1"), ("config.json", "is not UTF-8")),
    diff_torch("config-not-an-object", at("ckpt_config_list"), ("config.json", "is not a JSON object")),
    diff_torch("config-empty", at("ckpt_config_empty"), ("config.json", "not valid JSON")),
    diff_torch("truncated-weights", at("ckpt_truncated"), ("model.safetensors", "truncated or damaged")),
    diff_torch("mismatched-shapes", at("ckpt_shapes"), ("model.layers.1.mlp.Wo.weight", "has shape")),
    diff_torch("missing-keys", at("ckpt_missing"), ("do not match", "model.layers.2.attn.Wqkv.weight")),
    diff_torch("pickle-only", at("ckpt_pickle"), ("pytorch_model.bin", "--allow-pickle")),
    diff_torch("tokenizer-without-special-tokens", at("ckpt_no_special"), NO_SPECIAL),
    diff_torch("tokenizer-not-utf8", at("ckpt_tokenizer_latin1"), NOT_UTF8_TOKENIZER),
    diff_torch("json-inside-checkpoint", at("ckpt"), ("inside", "ckpt"), json_at=lambda i, d: i.ckpt / "m.json"),
    diff_torch("json-exists", at("ckpt"), ("exists", "--force"), setup=existing_file(out_json)),
    diff_torch("json-is-a-folder", at("ckpt"), ("m.json", "is a folder"), "--force", setup=folder_at(out_json)),
    diff_torch("json-folder-missing", at("ckpt"), ("does not exist",), json_at=lambda i, d: d / "no" / "m.json"),
    diff_torch("disk-full", at("ckpt"), (NO_SPACE, "m.json"), fsize=256, fresh=True, late=True),
    diff_torch("report-inside-checkpoint", at("ckpt"), ("inside", "ckpt"), "--report", lambda i, d: i.ckpt / "r",
               json_at=None),
    diff_torch("report-not-a-report", at("ckpt"), ("exists", "--force"), "--report", report_at, json_at=None,
               setup=lambda i, d: (report_at(i, d).mkdir(), (report_at(i, d) / "mine.txt").write_text("mine"))),
    diff_torch("report-disk-full", at("ckpt"), (NO_SPACE, "report"), "--report", report_at, json_at=None,
               fsize=256, fresh=True, late=True),

    # ---- diff_coreml.py
    diff_coreml("missing", missing, "no such package"),
    diff_coreml("a-file", at("pkg_file"), "is not an .mlpackage"),
    diff_coreml("a-checkpoint", at("ckpt"), "is not an .mlpackage"),
    diff_coreml("empty-folder", at("pkg_empty"), "is not an .mlpackage"),
    diff_coreml("unreadable", at("pkg_unreadable"), (UNREADABLE, "pkg-unreadable.mlpackage")),
    diff_coreml("not-ours", at("pkg_foreign"), NOT_OURS),
    diff_coreml("truncated-manifest", at("pkg_manifest"), DAMAGED),
    diff_coreml("truncated-model", at("pkg_mlmodel"), DAMAGED),
    diff_coreml("truncated-weights", at("pkg_weights"), (DAMAGED, "pkg-weights.mlpackage")),
    diff_coreml("checkpoint-moved", at("pkg_moved"), ("no such checkpoint folder", "--model")),
    diff_coreml("model-missing", at("pkg"), "no such checkpoint folder", "--model", missing),
    diff_coreml("model-unreadable-config", at("pkg"), (UNREADABLE, "config.json"), "--model",
                at("ckpt_config_unreadable")),
    diff_coreml("model-other-type", at("pkg"), "only 'modernbert' is supported", "--model", at("ckpt_bert")),
    diff_coreml("model-config-not-utf8", at("pkg"), "is not UTF-8", "--model", at("ckpt_config_latin1")),
    diff_coreml("model-truncated-weights", at("pkg"), ("model.safetensors", "truncated or damaged"),
                "--model", at("ckpt_truncated")),
    diff_coreml("model-mismatched-shapes", at("pkg"), ("model.layers.1.mlp.Wo.weight", "shape"),
                "--model", at("ckpt_shapes")),
    diff_coreml("model-missing-keys", at("pkg"), ("model.layers.2.attn.Wqkv.weight", "missing"),
                "--model", at("ckpt_missing")),
    diff_coreml("model-pickle-only", at("pkg"), ("pytorch_model.bin", "--allow-pickle"), "--model", at("ckpt_pickle")),
    diff_coreml("tokenizer-without-special-tokens", at("pkg"), NO_SPECIAL, "--tokenizer", at("tok_stripped")),
    diff_coreml("tokenizer-declaring-absent-tokens", at("pkg"), NOT_WRAPPING, "--tokenizer", at("tok_declared")),
    diff_coreml("tokenizer-not-utf8", at("pkg"), NOT_UTF8_TOKENIZER, "--tokenizer", at("tok_latin1")),
    diff_coreml("tokenizer-missing", at("pkg"), "no such tokenizer folder", "--tokenizer", missing),
    diff_coreml("json-inside-package", at("pkg"), ("inside", "pkg.mlpackage"),
                json_at=lambda i, d: i.pkg / "m.json"),
    diff_coreml("json-exists", at("pkg"), ("exists", "--force"), setup=existing_file(out_json)),
    diff_coreml("json-is-a-folder", at("pkg"), ("m.json", "is a folder"), "--force", setup=folder_at(out_json)),
    diff_coreml("disk-full", at("pkg"), (NO_SPACE, "m.json"), fsize=256, fresh=True, late=True),
    diff_coreml("report-inside-package", at("pkg"), ("inside", "pkg.mlpackage"), "--report",
                lambda i, d: i.pkg / "r", json_at=None),
    diff_coreml("report-is-a-file", at("pkg"), ("exists", "--force"), "--report", report_at, json_at=None,
                setup=lambda i, d: report_at(i, d).write_text("mine")),
]


# ----------------------------------------------------------------------------- output safety (issue 14)

def symlink_at(path_of, target=lambda i, d: d / "elsewhere"):
    def setup(i, d):
        path_of(d).symlink_to(target(i, d))
    return setup


def fifo_at(path_of):
    return lambda i, d: os.mkfifo(path_of(d))


def socket_at(path_of):
    def setup(i, d):
        import socket
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(path_of(d)))                         # the socket file stays after the close
    return setup


def checkpoint_inside_output(path_of):
    """The checkpoint copied inside what will be named as the output: --force would delete it."""
    return lambda i, d: copy_checkpoint(i.ckpt, path_of(d) / "ckpt")


def unwritable_folder(i, d):
    """A folder that takes no file: chmod 555, or as root (it writes anyway) /sys (sysfs refuses new files)."""
    if AS_ROOT:
        return Path("/sys")
    folder = d / "read-only"
    if not folder.exists():
        folder.mkdir()
        folder.chmod(0o555)
    return folder


NOT_OURS_PACKAGE = ("exists and is not a package written by convert.py", "--force replaces only")
SPECIAL_OUTPUT = "outputs are written only over regular files or folders"
DIFF_TORCH_JSON = {"model": "m", "task": "fill-mask", "precision": "float32"}
LEAVES = "paths inside an input must stay inside it"
NOT_REGULAR = "not a regular file"
NON_FINITE = "holds non-finite values"
DAMAGED_METADATA = "has damaged metadata"
MODERNBERT_TOKENIZER = ROOT / "tests" / "data" / "modernbert-tokenizer"

CASES += [
    # output safety: special files and symlinks are never written over, --force or not
    convert("output-is-a-symlink", at("ckpt"), ("symbolic link", SPECIAL_OUTPUT), "--force",
            setup=lambda i, d: ((d / "elsewhere").mkdir(), out_package(d).symlink_to(d / "elsewhere"))),
    convert("output-is-a-dangling-symlink", at("ckpt"), ("symbolic link", SPECIAL_OUTPUT),
            setup=symlink_at(out_package)),
    convert("output-is-a-fifo", at("ckpt"), ("FIFO", SPECIAL_OUTPUT), "--force", setup=fifo_at(out_package)),
    diff_torch("json-is-dev-null", at("ckpt"), ("/dev/null", "a device", SPECIAL_OUTPUT), "--force",
               json_at=lambda i, d: Path(os.devnull)),
    diff_torch("json-is-a-symlink", at("ckpt"), ("symbolic link",), "--force",
               setup=symlink_at(out_json, lambda i, d: i.a_file)),
    diff_coreml("json-is-a-socket", at("pkg"), ("socket", SPECIAL_OUTPUT), "--force", setup=socket_at(out_json)),
    diff_coreml("report-is-a-fifo", at("pkg"), ("FIFO",), "--report", report_at, "--force", json_at=None,
                setup=fifo_at(lambda d: d / "report")),
    # --force replaces only what a previous run of the same kind wrote
    convert("force-over-a-foreign-folder", at("ckpt"), NOT_OURS_PACKAGE, "--force", setup=existing_package),
    convert("force-over-a-file", at("ckpt"), NOT_OURS_PACKAGE, "--force", setup=existing_file(out_package)),
    convert("force-over-another-package", at("ckpt"), NOT_OURS_PACKAGE, "--force",
            setup=lambda i, d: shutil.copytree(i.pkg_foreign, out_package(d))),
    diff_torch("force-over-a-foreign-json", at("ckpt"), ("is not a --json file of diff_torch.py",), "--force",
               setup=existing_file(out_json)),
    diff_coreml("force-over-a-diff-torch-json", at("pkg"), ("is not a --json file of diff_coreml.py",), "--force",
                setup=lambda i, d: out_json(d).write_text(json.dumps(DIFF_TORCH_JSON))),
    # no output is or holds an input, counting every input
    convert("output-holds-the-checkpoint", lambda i, d: out_package(d) / "ckpt", ("would contain the input",),
            "--force", setup=checkpoint_inside_output(out_package)),
    diff_torch("report-holds-the-checkpoint", lambda i, d: report_at(i, d) / "ckpt", ("would contain the input",),
               "--report", report_at, "--force", json_at=None, setup=checkpoint_inside_output(lambda d: d / "report")),
    Case("convert-output-inside-the-tokenizer", "convert", lambda i, d: [
        i.ckpt, *CONVERT, "--tokenizer", i.tok_good, "-o", i.tok_good / "x.mlpackage"], ("is inside the input",
                                                                                         "tok-good")),
    diff_coreml("json-inside-the-metadata-checkpoint", at("pkg"), ("is inside the input", "ckpt"),
                json_at=lambda i, d: i.ckpt / "m.json"),
    diff_coreml("report-inside-the-tokenizer", at("pkg"), ("is inside the input", "tok-good"), "--tokenizer",
                at("tok_good"), "--report", lambda i, d: i.tok_good / "r", json_at=None),
    diff_coreml("json-is-the-tokenizer-file", at("pkg"), ("is inside the input", "tok-good"), "--tokenizer",
                at("tok_good"), "--force", json_at=lambda i, d: i.tok_good / "tokenizer.json"),
    # an unwritable or full location, found before the work (the probe file)
    convert("output-folder-unwritable", at("ckpt"), ("cannot write", "is not writable"), "-o",
            lambda i, d: unwritable_folder(i, d) / "x.mlpackage"),
    diff_torch("json-folder-unwritable", at("ckpt"), ("cannot write", "is not writable"),
               json_at=lambda i, d: unwritable_folder(i, d) / "m.json"),
    convert("disk-full-found-before-the-work", at("ckpt"), (NO_SPACE, "out.mlpackage"), fsize=2048, fresh=True),
    diff_coreml("disk-full-found-before-the-work", at("pkg"), (NO_SPACE, "m.json"), fsize=2048, fresh=True),

    # confinement: paths named inside an input stay inside it; special files are never opened
    convert("module-path-absolute", at("st_module_absolute"), ("modules.json", "'/etc' leaves", LEAVES)),
    convert("module-path-dotdot", at("st_module_dotdot"), ("modules.json", "'../ckpt' leaves", LEAVES)),
    diff_torch("transformer-path-dotdot", at("st_transformer_dotdot"), ("'../ckpt' leaves", LEAVES)),
    convert("shard-name-dotdot", at("ckpt_shard_dotdot"), ("model.safetensors.index.json", "leaves", LEAVES)),
    diff_torch("shard-name-absolute", at("ckpt_shard_absolute"), ("model.safetensors.index.json", "leaves")),
    convert("weights-link-out", at("ckpt_weights_link"), ("model.safetensors", "a link that leaves", LEAVES)),
    convert("tokenizer-link-out", at("ckpt"), ("tokenizer.json", "a link that leaves"), "--tokenizer",
            at("tok_link_out")),
    predict("manifest-item-escapes", lambda i, d: [i.pkg_manifest_escape, SHORT], ("Manifest.json", "leaves", LEAVES)),
    diff_coreml("manifest-item-escapes", at("pkg_manifest_escape"), ("Manifest.json", "leaves")),
    predict("weights-link-out", lambda i, d: [i.pkg_weights_link, SHORT], ("weight.bin", "link that leaves")),
    predict("weights-fifo", lambda i, d: [i.pkg_weights_fifo, SHORT], ("weight.bin", NOT_REGULAR)),
    diff_coreml("weights-fifo", at("pkg_weights_fifo"), ("weight.bin", NOT_REGULAR)),
    convert("config-fifo", at("ckpt_config_fifo"), ("config.json", NOT_REGULAR)),
    diff_torch("weights-fifo", at("ckpt_weights_fifo"), ("model.safetensors", NOT_REGULAR)),
    diff_coreml("model-config-fifo", at("pkg"), ("config.json", NOT_REGULAR), "--model", at("ckpt_config_fifo")),
    predict("tokenizer-fifo", lambda i, d: [i.pkg, SHORT, "--tokenizer", i.tok_fifo], ("tokenizer.json", NOT_REGULAR)),
    convert("tokenizer-fifo", at("ckpt"), ("tokenizer.json", NOT_REGULAR), "--tokenizer", at("tok_fifo")),

    # validation before allocation: config.json by type and range, sizes against the weights' headers
    convert("config-billion-layers", at("ckpt_layers_1e9"), ("num_hidden_layers 1000000000", "weights for 4 layers")),
    diff_torch("config-billion-layers", at("ckpt_layers_1e9"), ("num_hidden_layers 1000000000",)),
    convert("config-vocab-6e7", at("ckpt_vocab_6e7"), ("60000000 x 64", "does not match the weights")),
    diff_coreml("model-config-vocab-6e7", at("pkg"), ("60000000 x 64",), "--model", at("ckpt_vocab_6e7")),
    convert("config-hidden-size-float", at("ckpt_hidden_float"), ("hidden_size 64.0", "must be an integer")),
    diff_torch("config-heads-negative", at("ckpt_heads_negative"), ("num_attention_heads -4", "must be an integer >= 1")),
    convert("config-heads-not-dividing", at("ckpt_heads_5"), ("hidden_size 64 does not split into 5 heads",)),
    convert("config-window-1", at("ckpt_window_1"), ("local_attention 1", ">= 2")),
    diff_torch("config-unknown-activation", at("ckpt_activation"), ("activation 'tanhh' is not supported",)),
    convert("config-id2label-gap", at("ckpt_id2label_gap"), ("id2label keys must be 0..n-1",)),
    convert("config-layer-types-string", at("ckpt_layer_types_string"), ("layer_types must list 4 entries",)),
    convert("weights-nan", at("ckpt_nan"), ("model.layers.1.mlp.Wo.weight", NON_FINITE)),
    diff_torch("weights-inf", at("ckpt_inf"), ("model.embeddings.tok_embeddings.weight", NON_FINITE)),
    diff_coreml("model-weights-nan", at("pkg"), ("model.layers.1.mlp.Wo.weight", NON_FINITE), "--model", at("ckpt_nan")),
    convert("no-hadamard-of-the-hidden-size", at("ckpt_hidden_92"), ("no Hadamard matrix of order 92",
                                                                     "--rotation random", "--rotation none"),
            "--rotation", "hadamard"),
    diff_torch("no-hadamard-of-the-hidden-size", at("ckpt_hidden_92"), ("no Hadamard matrix of order 92",),
               "--rotation", "hadamard"),
    # package metadata by type; token ids against the package's vocabulary
    predict("metadata-labels-not-a-list", lambda i, d: [i.pkg_labels_bad, SHORT], (DAMAGED_METADATA, "labels")),
    predict("metadata-vocab-not-an-integer", lambda i, d: [i.pkg_vocab_bad, SHORT], (DAMAGED_METADATA, "vocab_size")),
    diff_coreml("metadata-lengths-negative", at("pkg_lengths_bad"), (DAMAGED_METADATA, "seq_lengths")),
    diff_coreml("token-ids-outside-the-vocabulary", at("pkg"), ("evaluation text 1 has token id", "outside"),
                "--tokenizer", MODERNBERT_TOKENIZER),
    predict("metadata-prompts-not-a-mapping", lambda i, d: [i.pkg_prompts_bad, SHORT], (DAMAGED_METADATA, "prompts")),
    predict("token-ids-outside-the-vocabulary", lambda i, d: [i.pkg, "the capital of france is [MASK].",
                                                              "--tokenizer", MODERNBERT_TOKENIZER],
            ("text 1 has token id", "outside", "vocabulary of", "--tokenizer")),
]
DEBUG_CASES = ["predict-file-not-utf8", "diff_torch-truncated-weights"]     # again with --debug: a traceback


# ----------------------------------------------------------------------------- running the table

class World:
    """The inputs, the launcher, and the background runs of the fresh cases."""

    def __init__(self, root: Path, good_checkpoint: Path):
        self.root = root
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.io_dir = root / "io"                              # stdin/stdout/stderr files: not snapshotted
        self.io_dir.mkdir()
        self.launcher = Launcher(self.io_dir, {**self.env, "TMPDIR": str(self.tmp_dir("launcher"))})
        self.inputs = build_inputs(root / "inputs", good_checkpoint)
        import matplotlib.font_manager  # noqa: F401  (its font cache, built once: not under a full-disk case)
        self.background = ThreadPoolExecutor(max_workers=2)
        self.futures = {}
        fresh = sorted((c for c in CASES if c.fresh), key=lambda c: c.cli != "convert")   # the slowest first
        for case in fresh:                                     # those without a package start now
            if not self.needs_packages(case):
                self.futures[case.id] = self.background.submit(self.run_checked, case)
        build_packages(root / "packages", self.inputs, self.launcher, self.env)
        for case in fresh:
            if self.needs_packages(case):
                self.futures[case.id] = self.background.submit(self.run_checked, case)

    @staticmethod
    def needs_packages(case: Case) -> bool:
        return case.cli in ("predict", "diff_coreml")

    def tmp_dir(self, name: str) -> Path:
        path = self.root / "tmp" / name
        path.mkdir(parents=True)
        return path

    def run_checked(self, case: Case, extra: tuple = ()):
        """(result, changes to the files): the case run once; the inputs, its folder (working directory and
        outputs) and its TMPDIR snapshotted around it."""
        folder = self.root / "cases" / (case.id + "".join(extra))
        folder.mkdir(parents=True)
        if case.setup:
            case.setup(self.inputs, folder)
        stdin = None
        if case.stdin is not None:
            stdin = self.io_dir / f"{folder.name}.stdin"
            stdin.write_bytes(case.stdin)
        argv = [str(a) for a in case.argv(self.inputs, folder)] + list(extra)
        # the packages are still being built while the first fresh cases run: those leave them out
        inputs = [self.inputs.root] + ([self.inputs.packages] if self.needs_packages(case) or not case.fresh else [])
        if case.fresh:
            tmp = self.tmp_dir(folder.name)
            scope = (*inputs, folder, tmp)
            before = snapshot(*scope)
            result = run_fresh(SCRIPTS[case.cli], argv, folder, stdin, {**self.env, "TMPDIR": str(tmp)}, case.fsize)
        else:
            scope = (*inputs, folder, self.root / "tmp" / "launcher")
            before = snapshot(*scope)
            result = self.launcher.run(SCRIPTS[case.cli], argv, folder, stdin, {})
        return result, changes(before, snapshot(*scope))

    def close(self):
        self.background.shutdown(wait=True)
        self.launcher.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory, checkpoint_factory):
    w = World(tmp_path_factory.mktemp("hostile"), checkpoint_factory("tiny"))
    yield w
    w.close()


def check_error_output(case: Case, result: Result) -> str:
    """The one error line, checked: no traceback; for bad input the only line on stderr, for a late failure
    the last one (after the progress lines and coremltools' progress bars)."""
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr[-3000:]
    if not case.late:
        assert len(lines) == 1, result.stderr[-3000:]
    return errors[0]


ORDERED = sorted(CASES, key=lambda c: c.fresh)      # the forked cases first, while the fresh ones run behind


@pytest.mark.parametrize("case", ORDERED, ids=[c.id for c in ORDERED])
def test_hostile_input(world, case):
    if case.fresh:
        result, changed = world.futures[case.id].result()
    else:
        result, changed = world.run_checked(case, [])
    assert result.code == case.code != 0, (result.code, result.stderr[-3000:])
    line = check_error_output(case, result)
    for words in case.message:
        assert words in line, line
    assert changed == [], changed


@pytest.mark.parametrize("case_id", DEBUG_CASES)
def test_debug_shows_the_traceback(world, case_id):
    case = next(c for c in CASES if c.id == case_id)
    result, changed = world.run_checked(case, ("--debug",))
    assert result.code != 0 and "Traceback (most recent call last)" in result.stderr, result.stderr[-3000:]
    assert any(words in result.stderr.splitlines()[-1] for words in case.message), result.stderr[-3000:]
    assert changed == [], changed


def test_every_cli_meets_every_kind_of_hostile_input():
    """The table covers, for every CLI, the kinds of input the issue names (where the CLI reads them)."""
    kinds = {"missing": ["missing"], "unreadable": ["unreadable"], "damaged": ["truncated"],
             "tokenizer": ["tokenizer-without-special-tokens"], "non-UTF-8": ["not-utf8"]}
    for cli in SCRIPTS:
        ids = [c.id for c in CASES if c.cli == cli]
        for kind, words in kinds.items():
            assert any(w in i for i in ids for w in words), (cli, kind)
    for cli, kind in [("convert", "other-model-type"), ("convert", "pickle-only"), ("convert", "disk-full"),
                      ("convert", "output-inside"), ("convert", "existing-output"), ("predict", "too-long"),
                      ("predict", "empty"), ("predict", "not-ours"), ("diff_torch", "other-model-type"),
                      ("diff_torch", "pickle-only"), ("diff_torch", "mismatched-shapes"), ("diff_torch", "disk-full"),
                      ("diff_torch", "json-inside"), ("diff_torch", "json-exists"), ("diff_coreml", "not-ours"),
                      ("diff_coreml", "model-other-type"), ("diff_coreml", "model-pickle-only"),
                      ("diff_coreml", "model-missing-keys"), ("diff_coreml", "disk-full"),
                      ("diff_coreml", "json-inside"), ("diff_coreml", "json-exists")]:
        assert any(c.cli == cli and kind in c.id for c in CASES), (cli, kind)
    # issue 14's classes, each with cases on several CLIs
    classes = {"special output": ["symlink", "fifo", "socket", "dev-null"], "force only over ours": ["force-over"],
               "output and inputs apart": ["inside", "holds-the"], "found before the work": ["unwritable", "before-the-work"],
               "confinement": ["dotdot", "absolute", "link-out", "escapes"], "special input": ["fifo"],
               "config before allocation": ["config-billion-layers", "config-vocab-6e7", "config-"],
               "non-finite": ["weights-nan", "weights-inf"], "hadamard": ["no-hadamard"], "metadata": ["metadata-"]}
    for name, words in classes.items():
        clis = {c.cli for c in CASES if any(w in c.id for w in words)}
        assert len(clis) >= 2, (name, clis)


def test_snapshot_sees_every_change(tmp_path):
    """What the table relies on: any file created, changed (even keeping size and mtime), re-moded or deleted,
    any folder left behind; a temporary file removed again is no change."""
    (tmp_path / "a").write_text("one")
    (tmp_path / "b").write_text("bee")
    (tmp_path / "d").mkdir()
    before = snapshot(tmp_path)
    (tmp_path / "d" / ".tmp").write_text("x")
    (tmp_path / "d" / ".tmp").unlink()
    assert changes(before, snapshot(tmp_path)) == []
    st = (tmp_path / "a").stat()
    (tmp_path / "a").write_text("two")
    os.utime(tmp_path / "a", ns=(st.st_atime_ns, st.st_mtime_ns))
    (tmp_path / "b").chmod(0o600)
    (tmp_path / "d" / "left.tmp").mkdir()
    (tmp_path / "c").write_text("")
    found = changes(before, snapshot(tmp_path))
    assert [c.split(":")[0] for c in found] == [f"created {tmp_path / 'c'}", f"created {tmp_path / 'd' / 'left.tmp'}",
                                                f"changed {tmp_path / 'a'}", f"changed {tmp_path / 'b'}"], found
    (tmp_path / "a").unlink()
    assert f"deleted {tmp_path / 'a'}" in changes(before, snapshot(tmp_path))


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EDQUOT, errno.EFBIG])
def test_writing_turns_a_full_disk_into_one_line(err):
    with pytest.raises(UserError, match=r"no space left to write out\.json \("):
        with writing("out.json"):
            raise OSError(err, os.strerror(err))
    with pytest.raises(UserError, match="no space left to write pkg"):       # coremltools' weight writer
        with writing("pkg"):
            raise RuntimeError("[MIL FileWriter]: Unknown error occurred while writing data to the file.")
    with pytest.raises(PermissionError):                                      # anything else goes through
        with writing("out.json"):
            raise PermissionError(errno.EACCES, "Permission denied")
