"""The Python API: the scripts' own code paths, called with keyword options instead of flags.

    from modernbert_ane.api import Predictor, compare, convert
    package = convert("answerdotai/ModernBERT-base", "base.mlpackage", seq_len=[128, 512])
    Predictor(package).fill_mask(["The capital of France is [MASK]."])
    compare(package)["kl_mean"]

Options are the scripts' flags with underscores (`seq_len=[128, 512]` is `--seq-len 128 512`, `force=True` is
`--force`); an option a script does not have is a TypeError. Bad input raises `UserError` (its message is the
line the script would print). Progress goes to stderr; the scripts' tables are not printed.
"""
import contextlib
import io
import json
import tempfile
from pathlib import Path

from modernbert_ane import convert as convert_script
from modernbert_ane import diff_coreml
from modernbert_ane import diff_torch
from modernbert_ane.predict import Predictor
from modernbert_ane.user_errors import UserError

__all__ = ["convert", "Predictor", "compare", "UserError"]


def _argv(parser, positional: list, options: dict) -> list[str]:
    """Flags for `options` ({"seq_len": [128, 512], "force": True}), refusing names the parser does not know."""
    known = {a.dest: a for a in parser._actions if a.option_strings}
    argv = [str(p) for p in positional if p is not None]
    for name, value in options.items():
        if name not in known:
            raise TypeError(f"unknown option {name!r} (one of {', '.join(sorted(known))})")
        flag = known[name].option_strings[-1]
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


def _parse(parser, argv: list[str]):
    """parse_args, with argparse's usage error raised as a UserError instead of exiting."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser.parse_args(argv)
    except SystemExit:
        raise UserError(err.getvalue().strip().splitlines()[-1]) from None


def convert(checkpoint, output=None, **options) -> Path:
    """Convert a checkpoint (hub id or folder) to an .mlpackage, as `python convert.py` does; returns its path.
    `output`: the package (default: named from the checkpoint and options, in the current folder)."""
    parser = convert_script.build_parser()
    args = _parse(parser, _argv(parser, [checkpoint], {"output": output, **options}))
    with contextlib.redirect_stdout(io.StringIO()):                 # the readiness summary: the script's
        return Path(convert_script.convert_checkpoint(args))


def compare(package_or_model, checkpoint=None, **options) -> dict:
    """Accuracy against float32 transformers: a package (as `diff_coreml.py`; `checkpoint` default: the one in
    its metadata) or a checkpoint run in model.py (as `diff_torch.py`). Returns the metrics of the script's
    --json (kl_mean, top1_agreement or cosine_min, delimiter and ordinary tokens, the worst token, gates...)."""
    is_package = str(package_or_model).rstrip("/").endswith(".mlpackage")
    script = diff_coreml if is_package else diff_torch
    if checkpoint is not None:
        if not is_package:
            raise TypeError("checkpoint is for a package; a model is its own checkpoint")
        options = {"model": checkpoint, **options}
    if "json" in options:
        raise TypeError("compare returns the metrics; use the scripts for a --json file")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "metrics.json"
        parser = script.build_parser()
        argv = _argv(parser, [package_or_model], {**options, "json": str(path)})
        _parse(parser, argv)
        with contextlib.redirect_stdout(io.StringIO()):
            script.main(argv)
        return json.loads(path.read_text())
