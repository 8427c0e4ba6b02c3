"""Fidelity of converted packages on the float16 emulator, for the test configurations.

    python bench/bench_fidelity.py [--work DIR]

Builds each small random checkpoint of tests/checkpoints.py (the same ones the tests use), converts it
with convert.py's defaults (Hadamard rotation) and runs diff_coreml.py on the emulator against float32
transformers. Prints a Markdown table for the README.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

# (label, builder arguments, convert options)
CASES = [
    ("tiny fill-mask (head_dim 16, global every 3rd)", dict(config="tiny", task="fill-mask"), []),
    ("biased fill-mask (all biases, head_dim 32)", dict(config="biased", task="fill-mask"), []),
    ("odd fill-mask (hidden 48, tanh GELU)", dict(config="odd", task="fill-mask"), []),
    ("tiny fill-mask, planted 3e4 outliers", dict(config="tiny", task="fill-mask", outliers=True), []),
    ("tiny fill-mask, planted outliers, int8", dict(config="tiny", task="fill-mask", outliers=True),
     ["--compress", "int8"]),
    ("biased classify", dict(config="biased", task="classify"), []),
    ("biased token-classify", dict(config="biased", task="token-classify"), []),
    ("tiny encoder", dict(config="tiny", task="encoder"), []),
    ("sentence-transformers (mean, Dense, Normalize)", dict(sentence_transformers=True), []),
]


def run(args: list[str]) -> None:
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if result.returncode:
        sys.exit(f"failed: {' '.join(args)}\n{result.stderr[-2000:]}")


def main() -> None:
    from checkpoints import build_checkpoint, build_sentence_transformers
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", help="folder for checkpoints and packages (default: a temporary one)")
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="fidelity-"))
    rows = ["| configuration | lengths | top-1 | kl_mean | cosine_min | nonfinite |", "|---|---|---|---|---|---|"]
    for i, (label, build, options) in enumerate(CASES):
        folder, package, report = work / f"ckpt{i}", work / f"pkg{i}.mlpackage", work / f"m{i}.json"
        print(f"{label} ...", file=sys.stderr)
        if build.pop("sentence_transformers", False):
            build_sentence_transformers(folder)
        else:
            build_checkpoint(folder, **build)
        run(["convert.py", str(folder), "--seq-len", "128", "512", "-o", str(package), "--force", *options])
        run(["diff_coreml.py", str(package), "--json", str(report), "--force", "--backend", "emulate"])
        m = json.loads(report.read_text())
        fmt = lambda k, f: format(m[k], f) if k in m else "–"  # noqa: E731
        rows.append(f"| {label} | 128, 512 | {fmt('top1_agreement', '.3f')} | {fmt('kl_mean', '.1e')} | "
                    f"{fmt('cosine_min', '.5f')} | {m['nonfinite']} |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
