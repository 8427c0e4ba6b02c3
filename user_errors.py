"""User-facing errors and the wrapper every command-line script runs its `main` in.

Bad input is answered with one line on stderr and a non-zero exit, never a traceback;
`--debug` anywhere on the command line shows the traceback instead.
"""
import sys


class UserError(Exception):
    """A problem with what the user asked for (a path, a checkpoint, an option), reported in one line."""


EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1


def one_line(message: str) -> str:
    """Collapse a message to one line (library errors often span several)."""
    return " ".join(str(message).split())


def run_cli(main, argv=None) -> None:
    """Run `main(argv)` and turn failures into one line on stderr and an exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        code = main(argv)
    except UserError as e:
        if debug:
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # an unexpected failure: still one line, the traceback is behind --debug
        if debug:
            raise
        print(f"error: internal error: {type(e).__name__}: {one_line(e)} (run again with --debug for the traceback)",
              file=sys.stderr)
        sys.exit(EXIT_INTERNAL_ERROR)
    sys.exit(code or 0)
