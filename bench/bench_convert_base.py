"""Benchmark: convert a random checkpoint with ModernBERT-base dimensions and emulate it once.

    python bench/bench_convert_base.py [--seq-len 512] [--layers 22] [--keep DIR]

Builds a random-initialized ModernBertForMaskedLM (22 layers, hidden 768, intermediate 1152, 12 heads,
vocab 50368) with transformers, saves it with a small tokenizer, then runs convert.py on it in a child
process (its step times, and its peak memory) and the float16 emulator on one full-length sequence in
another (wall time and peak memory). Prints a Markdown table for the README.
"""
import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

EMULATE = """
import sys
import time
import numpy as np
sys.path.insert(0, {root!r})
from modernbert_ane.coreml.emulator import MLProgramEmulator
t = time.perf_counter()
emu = MLProgramEmulator({package!r})
load = time.perf_counter() - t
S = {length}
ids = np.random.default_rng(0).integers(5, 600, size=(1, S)).astype(np.int32)
largest = [0, ""]
def observe(name, op_type, value):
    if np.size(value) > largest[0]:
        largest[:] = [np.size(value), f"{{op_type}}:{{'x'.join(map(str, np.shape(value)))}}"]
t = time.perf_counter()
out = emu.predict({{"input_ids": ids, "attention_mask": np.ones((1, S), np.int32)}}, observe=observe)
run = time.perf_counter() - t
print("RESULT", load, run, int(sum(np.isfinite(v).all() for v in out.values()) == len(out)), largest[1],
      largest[0] * 2 / 2**20)
"""


def run_child(cmd: list[str]) -> tuple[str, float, float]:
    """(stdout+stderr, wall seconds, peak RSS GiB) of a child process, measured alone."""
    t = time.perf_counter()
    wrapped = [sys.executable, "-c",
               "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
               "print('PEAK', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
               "sys.exit(r.returncode)"] + cmd
    result = subprocess.run(wrapped, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t
    if result.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{result.stdout}\n{result.stderr}")
    peak = next(int(l.split()[1]) for l in result.stderr.splitlines() if l.startswith("PEAK")) / 2**20
    return result.stdout + result.stderr, wall, peak


def base_checkpoint(work: Path, layers: int) -> Path:
    """work/base-random-<layers>: a random checkpoint with ModernBERT-base dimensions, built unless a previous run
    left it there (--keep)."""
    folder = work / f"base-random-{layers}"
    if not (folder / "config.json").exists():
        print(f"building a random base-size checkpoint in {folder} ...", file=sys.stderr)
        build_base_checkpoint(folder, layers)
    return folder


def build_base_checkpoint(folder: Path, layers: int) -> None:
    import torch
    import transformers
    from checkpoints import build_tokenizer
    tokenizer = build_tokenizer()
    config = transformers.ModernBertConfig(
        vocab_size=50368, hidden_size=768, intermediate_size=1152, num_hidden_layers=layers, num_attention_heads=12,
        pad_token_id=tokenizer.pad_token_id, cls_token_id=tokenizer.cls_token_id,
        sep_token_id=tokenizer.sep_token_id, bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)
    torch.manual_seed(0)
    transformers.ModernBertForMaskedLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--keep", help="build the checkpoint and package in this folder and keep them")
    args = p.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="bench-"))
    work.mkdir(parents=True, exist_ok=True)
    ckpt, package = base_checkpoint(work, args.layers), work / f"base-random-{args.seq_len}.mlpackage"
    out, wall, peak = run_child([sys.executable, "convert.py", str(ckpt), "--seq-len", str(args.seq_len),
                                 "-o", str(package), "--force", "--skip-check"])
    steps = next(l for l in out.splitlines() if l.startswith("wrote "))
    print(out, file=sys.stderr)
    emu_out, emu_wall, emu_peak = run_child([sys.executable, "-c", EMULATE.format(
        root=str(ROOT), package=str(package), length=args.seq_len)])
    _, load_s, run_s, finite, largest, largest_mib = next(l.split() for l in emu_out.splitlines()
                                                         if l.startswith("RESULT"))
    weights = sum(f.stat().st_size for f in package.rglob("*") if f.is_file()) / 2**20
    print("| step | wall time | peak memory |\n|---|---|---|")
    print(f"| convert.py ({args.layers} layers, seq {args.seq_len}; {steps.split('(', 1)[1].rstrip(')')}) "
          f"| {wall:.1f} s (process) | {peak:.2f} GiB |")
    print(f"| emulator: load package | {float(load_s):.1f} s | |")
    print(f"| emulator: one {args.seq_len}-token sequence (finite: {bool(int(finite))}) | {float(run_s):.1f} s "
          f"| {emu_peak:.2f} GiB (process) |")
    print(f"| largest intermediate tensor: {largest.replace(':', ' ')} | | {float(largest_mib):.0f} MiB in float16 |")
    print(f"\npackage size: {weights:.0f} MiB")


if __name__ == "__main__":
    main()
