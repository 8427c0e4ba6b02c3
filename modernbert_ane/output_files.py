"""Writing outputs safely: check the target before any work, build the output in a temporary folder beside
it (same file system, so the final rename is atomic), rename it into place, and leave nothing behind on
any failure (SIGTERM included: `user_errors.run_cli` turns it into an exception that unwinds like Ctrl-C).

The rules, for every output of every CLI (packages, --json, --report):
- a target that exists but is not a regular file or folder (a symlink, a device such as /dev/null, a FIFO,
  a socket) is refused, with or without --force;
- an existing target is replaced only with --force, and only when it is what a previous run of the same
  kind wrote (`ours`); checked again at the rename, where a target that appeared meanwhile is refused;
- no output is an input or inside one, and no input is inside an output (--force would delete it);
- the target folder must take a file (a probe file, written and removed) before the work starts.
"""
import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path
from typing import Callable

from modernbert_ane.user_errors import UserError, out_of_space, writing

PROBE_BYTES = 4096                      # a block: a full disk or a file-size limit shows on the probe
OURS_JSON_LIMIT = 64 << 20              # a --json file larger than this is not one of ours: not read to find out


class Ours:
    """What a previous run of the same kind wrote: `test(path)` says whether `path` is one, `what` names it."""

    def __init__(self, test: Callable[[Path], bool], what: str):
        self.test, self.what = test, what


def _kind(st: os.stat_result) -> str | None:
    """The name of a file type we never write over (None for a regular file or a folder)."""
    mode = st.st_mode
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file or folder"


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return path.lstat()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise UserError(f"cannot check the output {path} ({e.strerror or e})") from e


def refuse_special(target: Path, st: os.stat_result | None) -> None:
    """A symlink, device, FIFO or socket at the output path: never written over, --force or not."""
    kind = st and _kind(st)
    if kind:
        raise UserError(f"{target} exists and is {kind}; outputs are written only over regular files or folders "
                        f"(even with --force): give another output path")


def _local_inputs(inputs) -> list[Path]:
    return [Path(p).expanduser() for p in inputs if p and Path(p).expanduser().exists()]


def check_apart(target: Path, inputs) -> None:
    """No output may be an input or inside one, and no input may be inside an output (--force would delete
    it). Paths are compared resolved (symlinks followed, `..` removed)."""
    out = target.expanduser().resolve()
    for source in _local_inputs(inputs):
        src = source.resolve()
        if out == src or out.is_relative_to(src):
            raise UserError(f"{target} is inside the input {source}; write it elsewhere")
        if src.is_relative_to(out):
            raise UserError(f"{target} would contain the input {source}; write it elsewhere")


def probe_folder(target: Path) -> None:
    """Write and remove a small file beside `target`: an unwritable, read-only or full location is found
    before the work, in one line."""
    folder = target.parent
    with writing(target):                               # a full disk (or a file-size limit): one line
        try:
            fd, probe = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.", suffix=".probe")
        except OSError as e:
            if out_of_space(e):
                raise
            raise UserError(f"cannot write {target}: folder {folder} is not writable ({e.strerror or e})") from e
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(b"\0" * PROBE_BYTES)
        finally:
            os.unlink(probe)


def check_output(path, force: bool, *, inputs=(), folder: bool = False, ours: Ours | None = None) -> Path:
    """Everything about an output that can be checked before the work; returns it as a Path.
    `folder`: the output is a folder (a package, a report); `ours`: what --force may replace (None: anything
    of the right type; the caller checks more)."""
    target = Path(path)
    if target.name in ("", ".", ".."):
        raise UserError(f"the output needs a name, not {path}")
    st = _lstat(target)
    refuse_special(target, st)
    check_apart(target, inputs)
    if st is not None:
        if not force:
            raise UserError(f"{path} exists; pass --force to overwrite it")
        if stat.S_ISDIR(st.st_mode) and not folder:
            raise UserError(f"{path} is a folder; give the name of a file to write")
        if ours is not None and not ours.test(target):
            raise UserError(f"{path} exists and is not {ours.what}; --force replaces only {ours.what}")
    if not target.parent.is_dir():
        raise UserError(f"cannot write {path}: folder {target.parent} does not exist")
    probe_folder(target)
    return target


def json_with_keys(keys, what: str) -> Ours:
    """A --json output: a regular file holding a JSON object with all of `keys`."""
    def test(path: Path) -> bool:
        try:
            if not path.is_file() or path.stat().st_size > OURS_JSON_LIMIT:
                return False
            data = json.loads(path.read_bytes())
        except (OSError, ValueError):
            return False
        return isinstance(data, dict) and set(keys) <= set(data)
    return Ours(test, what)


@contextlib.contextmanager
def staging_folder(target: Path):
    """A temporary folder beside `target`, readable like a normal folder, always removed at the end."""
    target = Path(target)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)                              # mkdtemp makes it private
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


_RENAME_NOREPLACE = 1                                       # linux/fs.h


def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    return getattr(libc, "renameat2", None)


def rename_new(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`, which must not exist: atomically where the system can (Linux renameat2
    RENAME_NOREPLACE), else checked just before. FileExistsError when it does."""
    renameat2 = _renameat2()
    if renameat2 is not None:
        at_fdcwd = -100
        if renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(err, os.strerror(err), str(dst))
        if err not in (errno.EINVAL, errno.ENOSYS):         # a file system without the flag: the plain way
            raise OSError(err, os.strerror(err), str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def publish(staged: Path, target: Path, force: bool, ours: Ours | None = None) -> None:
    """Rename a finished file or folder into place. The target is checked again here (it may have appeared
    while the output was being built): a new one is never overwritten without `force`, a symlink, device,
    FIFO or socket never, and with `ours` only what a previous run of the same kind wrote."""
    staged, target = Path(staged), Path(target)
    st = _lstat(target)
    if st is None:
        try:
            rename_new(staged, target)
            return
        except FileExistsError:
            st = _lstat(target)
    refuse_special(target, st)
    if not force:
        raise UserError(f"{target} appeared while it was being written; pass --force to overwrite it")
    if ours is not None and not ours.test(target):
        raise UserError(f"{target} appeared while it was being written and is not {ours.what}; "
                        f"--force replaces only {ours.what}")
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.replace(target, old)
    os.replace(staged, target)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


def write_file(path, data: bytes, force: bool, ours: Ours | None = None) -> None:
    """Write `data` to `path` atomically (a temporary file beside it, published); a full disk is one line
    and leaves nothing behind."""
    target = Path(path)
    if not target.parent.is_dir():
        raise UserError(f"cannot write {path}: folder {target.parent} does not exist")
    with writing(path):
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)                    # mkstemp makes it private; a plain file is not
            publish(Path(tmp), target, force, ours)
        finally:
            Path(tmp).unlink(missing_ok=True)
