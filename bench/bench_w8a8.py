"""W8A8 next to float16 and weight-only compression, for each rotation: fidelity and package size, one run.

    python bench/bench_w8a8.py [--checkpoints reference reference-mlp-outliers] [--seq-len 128] [--work DIR]

For each checkpoint (bench_compression.py's: the bundled trained reference, plain or with planted MLP outliers),
converts with convert.py (float16 and int8 / palettize8 weights with --rotation hadamard; W8A8 with
--rotation none, hadamard, random and learned, --rotation-steps as given) and runs diff_coreml.py on the
float16 emulator against float32 transformers. Prints a Markdown table for the README: kl_mean, top-1,
top-5, kl_mean of the delimiter tokens ([CLS]/[SEP] and any token carrying massive activations) and of the
others, weights size, conversion time; and, for the learned rotation, the W8A8 error of the encoder output
on the calibration texts at the Hadamard start and after learning (convert.py's line).
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_compression import CHECKPOINTS, ROOT, weights_mib

VARIANTS = {                     # weight-only rows at the Hadamard too: one rotation, the compressions compared
    "float16": ["--compress", "none", "--rotation", "hadamard"],
    "int8": ["--compress", "int8", "--rotation", "hadamard"],
    "palettize8": ["--compress", "palettize8", "--rotation", "hadamard"],
    "w8a8 none": ["--compress", "w8a8", "--rotation", "none"],
    "w8a8 hadamard": ["--compress", "w8a8", "--rotation", "hadamard"],
    "w8a8 random": ["--compress", "w8a8", "--rotation", "random"],
    "w8a8 learned": ["--compress", "w8a8", "--rotation", "learned"],
}


def run(args: list[str]) -> tuple[float, str]:
    """(seconds, stderr) of a script of this project; exits on failure."""
    t = time.perf_counter()
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if result.returncode:
        sys.exit(f"failed: {' '.join(args)}\n{result.stderr[-2000:]}")
    return time.perf_counter() - t, result.stderr


def main() -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from checkpoints import build_reference
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoints", nargs="+", choices=[c for c in CHECKPOINTS if c.startswith("reference")],
                   default=["reference", "reference-mlp-outliers"])
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=[v for v in VARIANTS if v != "palettize8"],
                   help="default: all but palettize8 (README: Long sequences and compression has it)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rotation-steps", type=int, help="--rotation learned's steps (default: convert.py's)")
    p.add_argument("--work", help="folder for checkpoints and packages (default: a temporary one)")
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="w8a8-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = ["| checkpoint | package | kl_mean | top-1 | top-5 | kl_mean delimiters / others | weights | convert |",
            "|---|---|---|---|---|---|---|---|"]
    notes = []
    for name in args.checkpoints:
        folder = work / name
        if not (folder / "config.json").exists():
            print(f"building {name} in {folder} ...", file=sys.stderr)
            build = dict(CHECKPOINTS[name])
            build_reference(folder, build.pop("reference"), **build)
        for variant in args.variants:
            options = VARIANTS[variant] + (["--rotation-steps", str(args.rotation_steps)]
                                           if variant.endswith("learned") and args.rotation_steps is not None else [])
            slug = variant.replace(" ", "-")
            package, report = work / f"{name}-{slug}.mlpackage", work / f"{name}-{slug}.json"
            print(f"{name} {variant} ...", file=sys.stderr)
            seconds, err = run(["convert.py", str(folder), "--seq-len", str(args.seq_len), *options,
                                "--skip-check", "-o", str(package), "--force"])
            learned = re.search(r"W8A8 relative error of the encoder output: .*", err)
            if learned:
                notes.append(f"{name}, {variant}: {learned.group(0)}")
            run(["diff_coreml.py", str(package), "--json", str(report), "--force", "--backend", "emulate"])
            m = json.loads(report.read_text())
            split = " / ".join(f"{m[k]['kl_mean']:.1e}" for k in ("delimiter_tokens", "ordinary_tokens"))
            rows.append(f"| {name} | {variant} | {m['kl_mean']:.1e} | {m['top1_agreement']:.3f} | "
                        f"{m['top5_agreement']:.3f} | {split} | {weights_mib(package):.2f} MiB | {seconds:.0f} s |")
            print(rows[-1], file=sys.stderr)
    print("\n".join(rows + [""] + notes))


if __name__ == "__main__":
    main()
