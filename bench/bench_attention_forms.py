"""Benchmark: op and byte counts of the two local-attention forms (masked S x S, blockwise) at base size.

    python bench/bench_attention_forms.py [--lengths 512 2048 8192] [--forms masked blockwise] [--no-tied] [--keep DIR]

Counts come from saved ML Programs (package_cost, no emulation: fixed shapes) of random fill-mask models
with ModernBERT-base dimensions (768 wide, 12 heads, intermediate 1152, vocabulary 50368, window 128,
tied decoder), traced and converted by convert.py's own functions (float16, no rotation, no compression).
A 22-layer model at 8192 tokens is too heavy to convert here, so every count is taken from three small
stacks and scaled per layer, exactly for anything that adds up over ops (op counts, FLOPs, bytes):
c(g) (embeddings, one global layer 0 without attention norm, head and decoder), c(g, g), c(g, l) and
c(g, l, l); a global layer adds G = c(g, g) - c(g), a local one L = c(g, l, l) - c(g, l) (the first local
layer also brings the local mask, built once for all), and the 22-layer base model (8 global layers, 14
local) counts c(g, l) + 7 G + 13 L. The package size is scaled the same way, and also
measured in the layout before the tied decoder was stored once (the gather reading its own (V, C) table).
model.local_attention_bytes (what `--local-attention auto` compares) is printed beside the measured
difference of the two forms' local layers.
"""
import argparse
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

STACKS = {"g": ("full_attention",), "gg": ("full_attention",) * 2, "gl": ("full_attention", "sliding_attention"),
          "gll": ("full_attention", "sliding_attention", "sliding_attention")}
GLOBAL_LAYERS, LOCAL_LAYERS = 8, 14                    # ModernBERT-base: every 3rd of 22 layers, layer 0 included
METRICS = ("ops", "transpose", "matmul", "flops", "written", "read", "weights", "size")


def two_tables(self, input_ids, table=None):
    """Embeddings.forward before the tie: the gather reads a (V, C) table of its own."""
    h = self.norm(self.tok_embeddings(input_ids).transpose(1, 2).unsqueeze(2))   # (B, C, 1, S)
    return h, h if self.proj is None else self.proj(h)


def count(stack: tuple, form: str, length: int, folder: Path, tied: bool = True) -> dict:
    """The additive counts of one converted stack (a package already in `folder` is counted again, not rebuilt)."""
    import torch
    from modernbert_ane import convert
    from modernbert_ane.coreml import cost as package_cost
    from modernbert_ane.model import Embeddings, ModernBert, ModernBertConfig
    config = ModernBertConfig(num_hidden_layers=len(stack), layer_types=stack)
    torch.manual_seed(0)
    model = ModernBert(config, "fill-mask").eval()
    model.decoder.weight.data = model.embeddings.tok_embeddings.weight.data[:, :, None, None].clone()   # tied
    model.set_local_attention(form)
    package = folder / f"{form}-{length}-{''.join(s[0] for s in stack)}-{'tied' if tied else 'two'}.mlpackage"
    if not package.exists():
        forward = Embeddings.forward
        if not tied:
            Embeddings.forward = two_tables
        try:
            mlmodel = convert.to_mlprogram(convert.trace(model, length), "fill-mask", [length], "macOS15")
        finally:
            Embeddings.forward = forward
        mlmodel.save(str(package))
        del mlmodel
    summary = package_cost.summarize(package_cost.op_costs(package_cost.Program(package)))
    by_type = summary["ops_by_type"]
    return {"ops": summary["ops"], "transpose": by_type.get("transpose", 0),
            "matmul": by_type.get("matmul", 0) + by_type.get("einsum", 0), "flops": summary["flops"],
            "written": summary["activation_bytes_written"], "read": summary["activation_bytes_read"],
            "weights": summary["weight_bytes"],
            "size": sum(f.stat().st_size for f in package.rglob("*") if f.is_file())}


def scaled(c: dict) -> dict:
    """22 layers from the three stacks (module docstring)."""
    return {k: c["gl"][k] + (GLOBAL_LAYERS - 1) * (c["gg"][k] - c["g"][k])
            + (LOCAL_LAYERS - 1) * (c["gll"][k] - c["gl"][k]) for k in METRICS}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("--forms", nargs="+", choices=("masked", "blockwise"), default=["masked", "blockwise"])
    p.add_argument("--no-tied", action="store_true", help="skip the package size in the layout before the tie")
    p.add_argument("--keep", help="keep the packages in this folder")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    from modernbert_ane.model import ModernBertConfig
    try:
        from modernbert_ane.model import local_attention_bytes
    except ImportError:                                 # counting an older checkout
        local_attention_bytes = None
    folder = Path(args.keep or tempfile.mkdtemp(prefix="bench-forms-"))
    folder.mkdir(parents=True, exist_ok=True)
    base = ModernBertConfig()
    rows, estimates = [], []
    for length in args.lengths:
        per_form = {}
        for form in args.forms:
            c = {name: count(stack, form, length, folder) for name, stack in STACKS.items()}
            per_form[form] = c
            rows.append((length, form, scaled(c)))
            print(f"counted {form} at {length}", file=sys.stderr, flush=True)
        if local_attention_bytes is not None and len(per_form) == 2:
            measured = ((per_form["masked"]["gll"]["written"] - per_form["masked"]["gl"]["written"])
                        - (per_form["blockwise"]["gll"]["written"] - per_form["blockwise"]["gl"]["written"]))
            estimate = [local_attention_bytes(form, length, base.hidden_size, base.num_attention_heads,
                                              base.window_radius) for form in ("masked", "blockwise")]
            estimates.append((length, measured, estimate[0] - estimate[1]))
    print("| tokens | local attention | non-constant ops | transposes | matmul + einsum | GFLOP | activations "
          "written | activations read | weights read | package |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for length, form, s in rows:
        print(f"| {length} | {form} | {s['ops']:,} | {s['transpose']:,} | {s['matmul']:,} | {s['flops'] / 1e9:,.0f} "
              f"| {s['written'] / 2**20:,.0f} MiB | {s['read'] / 2**20:,.0f} MiB | {s['weights'] / 2**20:,.0f} MiB "
              f"| {s['size'] / 2**20:,.0f} MiB |")
    if estimates:
        print("\n| tokens | one local layer, masked minus blockwise bytes written: measured | "
              "model.local_attention_bytes |\n|---|---|---|")
        for length, measured, estimate in estimates:
            print(f"| {length} | {measured / 2**20:+,.1f} MiB | {estimate / 2**20:+,.1f} MiB |")
    if args.no_tied or "masked" not in args.forms:
        return
    length = args.lengths[0]
    two = scaled({name: count(stack, "masked", length, folder, tied=False) for name, stack in STACKS.items()})
    tied = next(s for n, form, s in rows if n == length and form == "masked")
    print(f"\ntied decoder, 22 layers, masked, {length} tokens: package {tied['size'] / 2**20:,.1f} MiB stored once, "
          f"{two['size'] / 2**20:,.1f} MiB with the gather's own table ({(two['size'] - tied['size']) / 2**20:,.1f} "
          f"MiB saved; weights read {tied['weights'] / 2**20:,.1f} vs {two['weights'] / 2**20:,.1f} MiB)")


if __name__ == "__main__":
    main()
