"""Package size and fidelity of every --compress mode, on a test checkpoint and on a base-size one.

    python bench/bench_compression.py [--checkpoints test test-outliers base] [--seq-len 128] [--work DIR]

Builds the checkpoints of tests/checkpoints.py (random ones: "test", with planted outliers by either
mechanism, and "base": ModernBERT-base's dimensions and vocabulary, 22 layers, its fill-mask head made
confident so top-1 is not a near-tie; and the bundled trained "reference", plain and with MLP outliers), converts each with convert.py --compress MODE (default float16 strategy, --skip-check) and runs
diff_coreml.py on the float16 emulator against float32 transformers. Prints a Markdown table for the README.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

CHECKPOINTS = {
    "test": dict(config="tiny"),
    "test-outliers": dict(config="tiny", outliers="embedding"),
    "test-mlp-outliers": dict(config="tiny", outliers="mlp"),
    "reference": dict(reference="fill-mask"),
    "reference-outliers": dict(reference="fill-mask", outliers="embedding"),
    "reference-mlp-outliers": dict(reference="fill-mask", outliers="mlp"),
    "base": dict(config="base"),
}
MODES = ("none", "int8", "palettize8", "palettize6", "palettize4")


def run(args: list[str]) -> float:
    t = time.perf_counter()
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if result.returncode:
        sys.exit(f"failed: {' '.join(args)}\n{result.stderr[-2000:]}")
    return time.perf_counter() - t


def weights_mib(package: Path) -> float:
    return sum(f.stat().st_size for f in (package / "Data").rglob("*") if f.is_file() and "weights" in f.parts) / 2**20


def main() -> None:
    from checkpoints import build_checkpoint, build_reference
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoints", nargs="+", choices=CHECKPOINTS, default=list(CHECKPOINTS))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--work", help="folder for checkpoints and packages (default: a temporary one)")
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="compression-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = ["| checkpoint | --compress | weights | vs float16 | top-1 | top-5 | kl_mean | convert |",
            "|---|---|---|---|---|---|---|---|"]
    for name in args.checkpoints:
        folder = work / name
        if not (folder / "config.json").exists():
            print(f"building {name} in {folder} ...", file=sys.stderr)
            build = dict(CHECKPOINTS[name])
            if "reference" in build:
                build_reference(folder, build.pop("reference"), **build)
            else:
                build_checkpoint(folder, **build)
        float16 = None
        for mode in args.modes:
            package, report = work / f"{name}-{mode}.mlpackage", work / f"{name}-{mode}.json"
            print(f"{name} --compress {mode} ...", file=sys.stderr)
            seconds = run(["convert.py", str(folder), "--seq-len", str(args.seq_len), "--compress", mode,
                           "--skip-check", "-o", str(package), "--force"])
            run(["diff_coreml.py", str(package), "--json", str(report), "--force", "--backend", "emulate"])
            m, size = json.loads(report.read_text()), weights_mib(package)
            float16 = float16 or (size if mode == "none" else None)
            ratio = f"{size / float16:.2f}x" if float16 else "–"
            rows.append(f"| {name} | {mode} | {size:.2f} MiB | {ratio} | {m['top1_agreement']:.3f} | "
                        f"{m['top5_agreement']:.3f} | {m['kl_mean']:.1e} | {seconds:.0f} s |")
            print(rows[-1], file=sys.stderr)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
