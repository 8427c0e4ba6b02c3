"""The command-line layer of the four scripts: argument groups (every shared flag declared here once, with
one help text), the report outputs' checks and the progress printer. `run_cli` (one-line errors, exit
codes) lives in user_errors.py. Each script's `build_parser()` is its own options plus these groups.
"""
import argparse
import json
import sys
import time

from modernbert_ane.checkpoint import DEFAULT_MODEL
from modernbert_ane.coreml.macos import COMPUTE_UNITS, DEFAULT_COMPUTE_UNITS
from modernbert_ane.coreml.runner import BACKENDS
from modernbert_ane.tasks import TASKS
from modernbert_ane.output_files import check_output, json_with_keys, write_file
from modernbert_ane.report import check_report_folder


def parser(doc: str) -> argparse.ArgumentParser:
    """A script's parser: its docstring's first paragraph as the description, and --debug."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


# ----------------------------------------------------------------------------- what is read

def add_checkpoint(p, positional: bool = True) -> None:
    """The checkpoint: a positional hub id or folder (convert, diff_torch), or --model (diff_coreml, where the
    package's metadata names it), with --revision (positional only: a package records its own) and
    --allow-pickle."""
    if positional:
        p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                       help=f"hub id or local folder (default {DEFAULT_MODEL})")
        p.add_argument("--revision", help="hub revision (branch, tag or commit)")
    else:
        p.add_argument("--model", help="the checkpoint it came from (default: the source and revision in its "
                                       "metadata)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read pytorch_model.bin when a checkpoint has no safetensors (tensors only, weights_only=True)")


def add_task(p, several: bool = False) -> None:
    """--task: the head to build (convert: several make a multi-function package)."""
    more = ("; several make a multi-function package (one function per task, named fill_mask, embed, ...; the "
            "encoder's weights stored once)") if several else ""
    p.add_argument("--task", choices=TASKS, nargs="+" if several else None,
                   help=f"default: from the checkpoint's architectures{more}")


def add_tokenizer(p) -> None:
    p.add_argument("--tokenizer", metavar="ID",
                   help="tokenizer hub id or folder (default: the checkpoint's own; for a package, the one recorded "
                        "at conversion, at its revision)")


def add_package(p, verb: str) -> None:
    """A converted package to run, and which head of a multi-function package."""
    p.add_argument("package", help="a .mlpackage written by convert.py")
    p.add_argument("--function", metavar="NAME",
                   help=f"which head of a multi-function package to {verb} (fill_mask, embed, ...; default: its "
                        f"default function)")


# ----------------------------------------------------------------------------- how it runs

def add_backend(p, check: bool = False) -> None:
    """What runs a package: --backend (with Core ML: --compute-units and --no-cache) for the scripts that run
    one, --check-backend for convert's check."""
    flag, what = ("--check-backend", "the correctness check") if check else ("--backend", "the package")
    p.add_argument(flag, choices=BACKENDS, default="auto",
                   help=f"what runs {what}: Core ML (macOS) or the float16 emulator (default auto: Core ML where "
                        f"it exists)")
    if check:
        return
    p.add_argument("--compute-units", choices=tuple(COMPUTE_UNITS), default=DEFAULT_COMPUTE_UNITS,
                   help=f"Core ML: where the model may run (default {DEFAULT_COMPUTE_UNITS}: CPU and Neural Engine)")
    p.add_argument("--no-cache", action="store_true",
                   help="Core ML: compile the package again instead of reusing the compiled copy in the cache")


def add_strategy(p, rotations, default: str, norms=None, norm_default: str = "", mlp_rotations=()) -> None:
    """The float16 strategy: rotation, seed and (given `norms`) the norm form, `norm_default` saying what an absent
    --norm means (convert: auto by default; diff_torch: one to look at); given `mlp_rotations`
    (rotations/online.MLP_ROTATION_KINDS, passed in so that this module imports no torch), --mlp-rotation."""
    auto = ("; auto: measure the candidate float16 strategies (none, identity or hadamard with a safe norm, none with "
            "l2eps) in float16 on the evaluation texts against float32 transformers and convert the best")
    p.add_argument("--rotation", choices=rotations, default=default,
                   help="orthogonal rotation fused into the weights (identity: norms folded, stream centred, not "
                        f"rotated){auto if 'auto' in rotations else ''} (default {default})")
    if norms:
        p.add_argument("--norm", choices=norms,
                       help="form of every norm: fused (one layer_norm op; overflows with massive activations), "
                            "safe (scaled by max|x| before squaring), l2eps (L2 norm with an epsilon channel); "
                            f"default: {norm_default}")
    if mlp_rotations:
        p.add_argument("--mlp-rotation", choices=mlp_rotations, default="none",
                       help="QuaRot's online rotation of every MLP's intermediate before its down projection (Wo), "
                            "for W8A8 when an MLP unit carries massive activations (README: W8A8): hadamard (a dense "
                            "I x I conv per layer) or block-hadamard (a grouped conv of Hadamard blocks of order "
                            "<= 128: fewer FLOPs, less spread); kept float16 under every --compress (default none)")
    p.add_argument("--seed", type=int, default=0, help="rotation seed (default 0)")


def add_query_chunk(p) -> None:
    p.add_argument("--query-chunk", type=int, metavar="N", help="global attention in query chunks of N tokens")


# ----------------------------------------------------------------------------- what is written

def add_report_outputs(p, report_help: str) -> None:
    """The diff scripts' outputs and gates: --json, --report, --force, --max-kl, --max-score-error."""
    p.add_argument("--json", metavar="PATH", help="write the metrics as JSON")
    p.add_argument("--report", metavar="DIR", help=f"write DIR/index.html: {report_help}")
    add_force(p)
    p.add_argument("--max-kl", type=float, metavar="X", help="exit 1 when kl_mean exceeds X (for CI)")
    p.add_argument("--max-score-error", type=float, metavar="X",
                   help="one-label heads (rerankers, regression): exit 1 when a score is off by more than X")


def add_force(p) -> None:
    p.add_argument("--force", action="store_true",
                   help="overwrite an existing output (only one this tool wrote)")


# What each script's --json holds: --force replaces only a file a previous run of the same script wrote.
JSON_KEYS = {"diff_torch": ("model", "task", "precision"), "diff_coreml": ("package", "model", "task")}


def check_output_path(path: str | None, force: bool, inside=(), folder: bool = False, script: str | None = None):
    """Checked before any slow work (output_files.check_output's rules): refuse special files and symlinks,
    an output inside one of the inputs (`inside`: every path read) or holding one, an existing output
    without --force (with it, a --json of another kind), a missing or unwritable folder, and (unless the
    output is itself a folder, a report) a folder."""
    if not path:
        return
    ours = None if folder or script is None else json_with_keys(JSON_KEYS[script], f"a --json file of {script}.py")
    check_output(path, force, inputs=inside, folder=folder, ours=ours)


def write_json(path: str, data: dict, force: bool = False, script: str | None = None) -> None:
    """Write atomically: a temporary file beside the target, published (checked again) in its place."""
    ours = None if script is None else json_with_keys(JSON_KEYS[script], f"a --json file of {script}.py")
    text = json.dumps(data, indent=2, sort_keys=True, allow_nan=True) + "\n"
    write_file(path, text.encode("utf-8"), force, ours)


def check_report_outputs(args, inputs, script: str) -> None:
    """--json and --report checked before any slow work (no symlink or special file, not inside an input, not
    existing without --force; a report folder replaced only when it holds a previous report)."""
    check_output_path(args.json, args.force, inside=inputs, script=script)
    check_output_path(args.report, args.force, inside=inputs, folder=True)
    check_report_folder(args.report, args.force)


# ----------------------------------------------------------------------------- progress

class Progress:
    """"[2/6] tracing at 512 tokens ..." on stderr when a step starts, its seconds when it ends. A step
    that reads the user's input is announced only once it succeeded (`announce="done"`), so bad input
    gets its one error line on stderr and nothing else."""

    def __init__(self, steps: int):
        self.steps, self.step, self.times = steps, 0, {}

    def start(self, what: str, announce: str = "start") -> None:
        self.step += 1
        self.what, self.t0, self.announce = what, time.perf_counter(), announce
        if announce == "start":
            self._print_start()

    def done(self) -> None:
        self.times[self.what] = time.perf_counter() - self.t0
        if self.announce == "done":
            self._print_start()
        print(f"      {self.times[self.what]:.1f} s", file=sys.stderr, flush=True)

    def _print_start(self) -> None:
        print(f"[{self.step}/{self.steps}] {self.what} ...", file=sys.stderr, flush=True)

    def summary(self) -> str:
        """Seconds per kind of step ("converting 9.8 s"), summed over the tasks of a multi-function package."""
        totals = {}
        for what, seconds in self.times.items():
            verb = what.split(": ")[-1].split(" ")[0]
            totals[verb] = totals.get(verb, 0.0) + seconds
        return ", ".join(f"{verb} {seconds:.1f} s" for verb, seconds in totals.items())
