"""Writing outputs safely: build them in a temporary folder beside the target (same file system, so
the final rename is atomic), rename into place, and leave nothing behind on any failure."""
import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from user_errors import UserError


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


def publish(staged: Path, target: Path, force: bool) -> None:
    """Rename a finished file or folder into place; an existing target is replaced only with `force`
    (checked again here: it may have appeared while the output was being built)."""
    staged, target = Path(staged), Path(target)
    if not (target.exists() or target.is_symlink()):
        os.replace(staged, target)
        return
    if not force:
        raise UserError(f"{target} appeared while it was being written; pass --force to overwrite it")
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.replace(target, old)
    os.replace(staged, target)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)
