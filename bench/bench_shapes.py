"""Package size of the two multi-length layouts, side by side: enumerated shapes against a function per length.

    python bench/bench_shapes.py [--checkpoints test base] [--seq-len 128 512] [--work DIR]

For each checkpoint (tests/checkpoints.py: "test" is the tiny random config, "base" has ModernBERT-base's
dimensions and vocabulary, 22 layers, random weights) converts it twice with the same options, `--shapes
enumerated` and `--shapes functions` (the float16 strategy forced to `--rotation none --norm safe` and the
check skipped, so both runs do the same work but the layout; the strategy does not change the sizes), and
prints per layout: the weights (weight.bin), the whole package, the spec (model.mlmodel, the programs), the
non-constant ops of each function, the conversion's wall time, and the largest difference between the two
layouts' outputs on the emulator at each length (one all-token sequence each). A Markdown table for the README.
"""
import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

CHECKPOINTS = {"test": "tiny", "base": "base"}
LAYOUTS = ("enumerated", "functions")


def convert(folder: Path, package: Path, lengths: list[int], shapes: str) -> float:
    """convert.py in a child process; its wall seconds."""
    start = time.perf_counter()
    cmd = [sys.executable, "convert.py", str(folder), "--seq-len", *map(str, lengths), "--shapes", shapes,
           "--rotation", "none", "--norm", "safe", "--skip-check", "-o", str(package), "--force"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{result.stderr[-2000:]}")
    return time.perf_counter() - start


def mib(files) -> float:
    return sum(f.stat().st_size for f in files if f.is_file()) / 2**20


def sizes(package: Path) -> dict:
    files = list(package.rglob("*"))
    return {"weights": mib(f for f in files if "weights" in f.parts), "package": mib(files),
            "spec": mib(f for f in files if f.name == "model.mlmodel")}


def ops_per_function(package: Path) -> dict[str, int]:
    """function -> its non-constant ops, from the saved spec."""
    from modernbert_ane.coreml.package import Package
    spec = Package(package).spec
    return {name: sum(op.type != "const" for op in f.block_specializations[f.opset].operations)
            for name, f in sorted(spec.mlProgram.functions.items())}


def outputs_differ(enumerated: Path, functions: Path, lengths: list[int]) -> dict[int, float]:
    """length -> max |enumerated - functions| of the output on one sequence of distinct ordinary tokens."""
    from modernbert_ane.coreml.runner import PackageRunner
    differences = {}
    for n in lengths:
        ids = np.arange(10, 10 + n, dtype=np.int32)[None]                       # (1, n), no padding
        inputs = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        a = next(iter(PackageRunner(enumerated, "emulate").predict(inputs).values()))
        b = next(iter(PackageRunner(functions, "emulate").predict(inputs).values()))
        differences[n] = float(np.abs(a - b).max())
    return differences


def main() -> None:
    from checkpoints import build_checkpoint
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoints", nargs="+", choices=CHECKPOINTS, default=list(CHECKPOINTS))
    p.add_argument("--seq-len", type=int, nargs="+", default=[128, 512])
    p.add_argument("--work", help="folder for checkpoints and packages (default: a temporary one)")
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="shapes-"))
    work.mkdir(parents=True, exist_ok=True)
    lengths = sorted(set(args.seq_len))
    rows = ["| checkpoint | lengths | --shapes | weights | package | spec | non-const ops per function | convert | "
            "max \\|difference\\| |", "|---|---|---|---|---|---|---|---|---|"]
    for name in args.checkpoints:
        folder = work / name
        if not (folder / "config.json").exists():
            print(f"building {name} in {folder} ...", file=sys.stderr)
            build_checkpoint(folder, CHECKPOINTS[name])
        packages = {}
        for shapes in LAYOUTS:
            packages[shapes] = work / f"{name}-{shapes}.mlpackage"
            print(f"{name} --shapes {shapes} ...", file=sys.stderr)
            seconds = convert(folder, packages[shapes], lengths, shapes)
            s, ops = sizes(packages[shapes]), ops_per_function(packages[shapes])
            packages[shapes] = (packages[shapes], s, ops, seconds)
        differences = outputs_differ(packages["enumerated"][0], packages["functions"][0], lengths)
        for shapes, (package, s, ops, seconds) in packages.items():
            shown = ", ".join(f"{f} {n}" for f, n in ops.items())
            differ = ("–" if shapes == "enumerated" else
                      ", ".join(f"{n}: {d:.2g}" for n, d in differences.items()))
            rows.append(f"| {name} | {' '.join(map(str, lengths))} | {shapes} | {s['weights']:.2f} MiB | "
                        f"{s['package']:.2f} MiB | {s['spec']:.2f} MiB | {shown} | {seconds:.0f} s | {differ} |")
            print(rows[-1], file=sys.stderr)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
