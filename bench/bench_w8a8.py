"""W8A8 next to float16 and weight-only compression, for each rotation: fidelity and package size, one run.

    python bench/bench_w8a8.py [--checkpoints reference reference-mlp-outliers] [--seq-len 128] [--work DIR]
        [--mlp-rotations none hadamard block-hadamard]

For each checkpoint (bench_compression.py's: the bundled trained reference, plain or with planted MLP outliers),
converts with convert.py (float16 and int8 / palettize8 weights with --rotation hadamard; W8A8 with
--rotation none, hadamard, random and learned, --rotation-steps as given) and runs diff_coreml.py on the
float16 emulator against float32 transformers. Prints a Markdown table for the README: kl_mean, top-1,
top-5, kl_mean of the delimiter tokens ([CLS]/[SEP] and any token carrying massive activations) and of the
others, weights size, conversion time; and, for the learned rotation, the W8A8 error of the encoder output
on the calibration texts at the Hadamard start and after learning (convert.py's line). --mlp-rotations runs
every variant with each --mlp-rotation given (QuaRot's online rotation before mlp.Wo), side by side in an
"MLP rotation" column, and prints the FLOPs and weight bytes each adds at the package's length (the cost
counts convert.py stores in the package metadata).
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
    p.add_argument("--mlp-rotations", nargs="+", choices=("none", "hadamard", "block-hadamard"), default=["none"],
                   help="convert.py --mlp-rotation values, each a row per variant (default: none only)")
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="w8a8-"))
    work.mkdir(parents=True, exist_ok=True)
    mlp_column = args.mlp_rotations != ["none"]
    rows = ["| checkpoint | package |" + (" MLP rotation |" if mlp_column else "")
            + " kl_mean | top-1 | top-5 | kl_mean delimiters / others | weights | convert |",
            "|---|---|" + ("---|" if mlp_column else "") + "---|---|---|---|---|---|"]
    notes, costs = [], {}
    for name in args.checkpoints:
        folder = work / name
        if not (folder / "config.json").exists():
            print(f"building {name} in {folder} ...", file=sys.stderr)
            build = dict(CHECKPOINTS[name])
            build_reference(folder, build.pop("reference"), **build)
        for variant, mlp in [(v, m) for v in args.variants for m in args.mlp_rotations]:
            options = VARIANTS[variant] + (["--rotation-steps", str(args.rotation_steps)]
                                           if variant.endswith("learned") and args.rotation_steps is not None else [])
            options += ["--mlp-rotation", mlp] if mlp != "none" else []
            slug = variant.replace(" ", "-") + ("" if mlp == "none" else f"-mlp-{mlp}")
            package, report = work / f"{name}-{slug}.mlpackage", work / f"{name}-{slug}.json"
            print(f"{name} {variant} (MLP rotation {mlp}) ...", file=sys.stderr)
            seconds, err = run(["convert.py", str(folder), "--seq-len", str(args.seq_len), *options,
                                "--skip-check", "-o", str(package), "--force"])
            learned = re.search(r"W8A8 relative error of the encoder output: .*", err)
            if learned:
                notes.append(f"{name}, {variant}: {learned.group(0)}")
            run(["diff_coreml.py", str(package), "--json", str(report), "--force", "--backend", "emulate"])
            m = json.loads(report.read_text())
            split = " / ".join(f"{m[k]['kl_mean']:.1e}" for k in ("delimiter_tokens", "ordinary_tokens"))
            rows.append(f"| {name} | {variant} |" + (f" {mlp} |" if mlp_column else "") + f" {m['kl_mean']:.1e} | {m['top1_agreement']:.3f} | "
                        f"{m['top5_agreement']:.3f} | {split} | {weights_mib(package):.2f} MiB | {seconds:.0f} s |")
            print(rows[-1], file=sys.stderr)
            costs[(name, variant, mlp)] = package_cost(package)
    if mlp_column:
        notes += ["", "| checkpoint | package | MLP rotation | GFLOP | conv GFLOP | weights read | extra GFLOP | "
                      "extra weights |", "|---|---|---|---|---|---|---|---|"]
        for (name, variant, mlp), (flops, conv, weights) in costs.items():
            base = costs.get((name, variant, "none"))
            extra = (f"+{(flops - base[0]) / 1e9:.4f} (+{100 * (flops / base[0] - 1):.1f} %) | "
                     f"+{(weights - base[2]) / 2**20:.2f} MiB" if base else "– | –")
            notes.append(f"| {name} | {variant} | {mlp} | {flops / 1e9:.4f} | {conv / 1e9:.4f} | "
                         f"{weights / 2**20:.2f} MiB | {extra} |")
    print("\n".join(rows + [""] + notes))


def package_cost(package: Path) -> tuple[float, float, float]:
    """(FLOPs, conv FLOPs, weight bytes read) at the package's largest length: the counts convert.py stored
    in its metadata (coreml/cost.py)."""
    sys.path.insert(0, str(ROOT))
    from modernbert_ane.coreml.package import read_metadata
    cost = read_metadata(package)["cost"]
    at = cost[max(cost, key=int)]
    return at["flops"], at["flops_by_category"].get("conv", 0), at["weight_bytes"]


if __name__ == "__main__":
    main()
