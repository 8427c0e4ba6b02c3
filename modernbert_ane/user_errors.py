"""User-facing errors and the wrapper every command-line script runs its `main` in.

Bad input is answered with one line on stderr and a non-zero exit, never a traceback;
`--debug` anywhere on the command line shows the traceback instead. A write that runs out of room
(a full disk, a quota, a file-size limit) is bad luck rather than a bug: `writing(target)` turns it
into one line naming what was being written; `run_cli` says the same of stdout, and stops quietly
(exit 141) when stdout's reader went away. SIGTERM unwinds like Ctrl-C (temporary folders are removed)
and exits 143.
"""
import errno
import os
import signal
import sys
import threading
import tempfile
from contextlib import contextmanager


class UserError(Exception):
    """A problem with what the user asked for (a path, a checkpoint, an option), reported in one line."""


EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1
EXIT_BROKEN_PIPE = 128 + 13                    # what a shell reports for a tool stopped by SIGPIPE
EXIT_TERMINATED = 128 + 15                     # ... and for one stopped by SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that its cleanup (`finally`, context managers) runs as for
    Ctrl-C instead of the process vanishing with its temporary folders left behind."""


def _raise_terminated(signum, frame):
    raise Terminated()


def one_line(message: str) -> str:
    """Collapse a message to one line (library errors often span several)."""
    return " ".join(str(message).split())


NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})   # disk full, quota, file-size limit
# coremltools' C++ weight writer reports a failed write as a RuntimeError without an errno
_FAILED_WRITE_MESSAGES = ("error occurred while writing data to the file",)


def out_of_space(e: BaseException) -> bool:
    """Whether `e` is a write that failed for lack of room."""
    if isinstance(e, OSError):
        return e.errno in NO_SPACE_ERRNOS
    return isinstance(e, RuntimeError) and any(m in str(e) for m in _FAILED_WRITE_MESSAGES)


@contextmanager
def writing(target):
    """Run the block that writes `target`; running out of room inside it becomes a UserError naming
    `target`. The writer's own cleanup (temporary files) runs first, as for any failure."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        if not out_of_space(e):
            raise
        if isinstance(e, OSError):
            detail = e.strerror or one_line(e)
        else:                                   # coremltools: its temporary copy may be what did not fit
            detail = f"{one_line(e)}; temporary files go to {tempfile.gettempdir()}"
        raise UserError(f"no space left to write {target} ({detail}); free some space or write it elsewhere") from e


def run_cli(main, argv=None) -> None:
    """Run `main(argv)` and turn failures into one line on stderr and an exit code. SIGTERM raises
    Terminated while `main` runs (the caller's handler is put back after: tests run CLIs in process)."""
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if on_main_thread else None
    try:
        _run_cli(main, list(sys.argv[1:] if argv is None else argv))
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run_cli(main, argv: list) -> None:
    debug = "--debug" in argv
    try:
        code = main(argv)
        sys.stdout.flush()                      # a full disk or a closed pipe on stdout shows here, not at exit
    except BrokenPipeError:
        # the reader of stdout went away (`predict.py ... | head -1`): stop quietly, as command-line tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # and nothing fails again at exit
        sys.exit(EXIT_BROKEN_PIPE)
    except UserError as e:
        if debug:
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except Terminated:
        print("error: terminated", file=sys.stderr)
        sys.exit(EXIT_TERMINATED)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except OSError as e:
        if debug or not out_of_space(e):
            _internal_error(e, debug)
        # files are saved inside writing(), which names them: what is left is stdout (or a temporary file)
        print(f"error: no space left to write standard output or a temporary file ({e.strerror}); free some space "
              f"or redirect the output elsewhere", file=sys.stderr)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # the unwritten rest: not again at exit
        sys.exit(EXIT_USER_ERROR)
    except Exception as e:  # an unexpected failure: still one line, the traceback is behind --debug
        _internal_error(e, debug)
    sys.exit(code or 0)


def _internal_error(e: Exception, debug: bool) -> None:
    if debug:
        raise e
    print(f"error: internal error: {type(e).__name__}: {one_line(e)} (run again with --debug for the traceback)",
          file=sys.stderr)
    sys.exit(EXIT_INTERNAL_ERROR)
