"""What --mlp-rotation costs at ModernBERT-base dimensions: FLOPs and bytes of the converted package.

    python bench/bench_mlp_rotation_cost.py [--seq-len 512] [--layers 22] [--keep DIR]

Builds bench_convert_base.py's random base-size checkpoint (22 layers, hidden 768, intermediate 1152), converts
it with convert.py (--rotation hadamard, --skip-check) once per --mlp-rotation (none, hadamard, block-hadamard)
and prints, from the cost counts convert.py stores in each package's metadata (coreml/cost.py, at the
package's length), the total and conv GFLOP, the weight bytes the program reads, the activation bytes its
ops write and the package's size on disk, with what each rotation adds over none. With --keep, a package
already converted there is read again, not converted again ("convert" then shows 0 s). Costs do not depend on the weights (random ones are fine) nor on
--compress (the online convs stay float16 under every mode).
"""
import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

KINDS = ("none", "hadamard", "block-hadamard")


def main() -> None:
    from bench_convert_base import base_checkpoint
    from modernbert_ane.coreml.package import read_metadata
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--keep", help="build the checkpoint and packages in this folder and keep them")
    args = p.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="mlp-rotation-cost-"))
    work.mkdir(parents=True, exist_ok=True)
    ckpt = base_checkpoint(work, args.layers)
    rows = {}
    for kind in KINDS:
        package = work / f"base-{kind}-{args.seq_len}.mlpackage"
        print(f"converting with --mlp-rotation {kind} ...", file=sys.stderr)
        t = time.perf_counter()
        result = None if args.keep and (package / "Manifest.json").exists() else subprocess.run([sys.executable, "convert.py", str(ckpt), "--seq-len", str(args.seq_len),
                                 "--rotation", "hadamard", "--mlp-rotation", kind, "--skip-check", "-o", str(package),
                                 "--force"], cwd=ROOT, capture_output=True, text=True)
        if result is not None and result.returncode:
            sys.exit(f"convert.py failed:\n{result.stderr[-2000:]}")
        cost = read_metadata(package)["cost"][str(args.seq_len)]
        size = sum(f.stat().st_size for f in package.rglob("*") if f.is_file())
        rows[kind] = (cost["flops"], cost["flops_by_category"].get("conv", 0), cost["weight_bytes"],
                      cost["activation_bytes_written"], size, (time.perf_counter() - t) if result else 0.0)
    base = rows["none"]
    print(f"| --mlp-rotation | GFLOP at {args.seq_len} tokens | conv GFLOP | weights read | activations written | "
          f"package | added FLOPs | added activation bytes | added package bytes | convert |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for kind, (flops, conv, weights, written, size, seconds) in rows.items():
        added = "–" if kind == "none" else f"+{(flops - base[0]) / 1e9:.2f} GFLOP (+{100 * (flops / base[0] - 1):.1f} %)"
        more = "–" if kind == "none" else (f"+{(written - base[3]) / 2**20:.1f} MiB "
                                          f"(+{100 * (written / base[3] - 1):.1f} %)")
        grown = "–" if kind == "none" else f"+{(size - base[4]) / 2**20:.2f} MiB"
        print(f"| {kind} | {flops / 1e9:.2f} | {conv / 1e9:.2f} | {weights / 2**20:.1f} MiB | {written / 2**20:.0f} MiB | "
              f"{size / 2**20:.1f} MiB | {added} | {more} | {grown} | {seconds:.0f} s |")


if __name__ == "__main__":
    main()
