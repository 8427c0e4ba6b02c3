"""Where a checkpoint's large activations are: the residual stream per layer, and which module writes them.

    python bench/activation_stats.py tests/data/reference       # the bundled trained model

Runs transformers' own ModernBERT (float32) on the built-in evaluation texts and on held-out Python
standard-library windows (bench/train_reference.py's split), and prints, per layer, the largest
|value| of the residual stream, the token and channel it sits on, the median |value| and their ratio,
and the largest output of that layer's attention and MLP (the two writers of the stream). A massive
activation is a value thousands of times the median on a few fixed channels of a few tokens.
"""
import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]


def texts_to_run(tokenizer, n_code: int = 16, seq_len: int = 256) -> list[list[int]]:
    """Token ids of the evaluation texts (prose) and of `n_code` held-out source windows."""
    from modernbert_ane.evaluation import EVAL_TEXTS
    from train_reference import chunk, corpus_files, token_stream
    prose = [tokenizer(t.replace("[MASK]", tokenizer.mask_token))["input_ids"] for t in EVAL_TEXTS]
    stream, _ = token_stream(tokenizer, corpus_files(), held_out=True)
    code = chunk(stream, seq_len, tokenizer.cls_token_id, tokenizer.sep_token_id)[:n_code].tolist()
    return prose + code


@torch.no_grad()
def layer_stats(model, tokenizer, sequences: list[list[int]]) -> list[dict]:
    base = model.model if hasattr(model, "model") else model
    writers = {}

    def hook(name):
        def record(module, args, out):
            out = out[0] if isinstance(out, tuple) else out
            writers[name] = max(writers.get(name, 0.0), out.abs().max().item())
        return record

    stream = []                                                  # the residual stream: what each block outputs

    def keep(module, args, out):
        stream.append(out[0] if isinstance(out, tuple) else out)

    handles = [layer.attn.register_forward_hook(hook(f"{i}.attn")) for i, layer in enumerate(base.layers)]
    handles += [layer.mlp.register_forward_hook(hook(f"{i}.mlp")) for i, layer in enumerate(base.layers)]
    handles += [block.register_forward_hook(keep) for block in [base.embeddings, *base.layers]]
    rows = []
    for ids in sequences:
        stream.clear()
        base(input_ids=torch.tensor([ids]))
        for depth, h in enumerate(stream):                       # 0: embeddings (after their norm)
            a = h[0].abs()                                       # (S, C)
            flat = int(a.argmax())
            row = dict(peak=a.max().item(), median=a.median().item(), token=tokenizer.convert_ids_to_tokens(
                ids[flat // a.shape[1]]), position=flat // a.shape[1], channel=flat % a.shape[1])
            if depth >= len(rows):
                rows.append(dict(row, medians=[row["median"]]))
            else:
                rows[depth]["medians"].append(row["median"])
                if row["peak"] > rows[depth]["peak"]:
                    rows[depth].update({k: v for k, v in row.items() if k != "median"})
    for handle in handles:
        handle.remove()
    for depth, row in enumerate(rows):
        row["median"] = float(torch.tensor(row.pop("medians")).median())
        row["attn"] = writers.get(f"{depth - 1}.attn") if depth else None
        row["mlp"] = writers.get(f"{depth - 1}.mlp") if depth else None
    return rows


def markdown(rows: list[dict]) -> str:
    out = ["| residual stream after | largest \\|x\\| | token (position) | channel | median \\|x\\| | ratio | "
           "largest attention / MLP output |", "|---|---|---|---|---|---|---|"]
    for depth, r in enumerate(rows):
        where = "embeddings (norm)" if depth == 0 else f"layer {depth - 1}"
        writers = "–" if r["attn"] is None else f"{r['attn']:.1f} / {r['mlp']:.1f}"
        out.append(f"| {where} | {r['peak']:.1f} | `{r['token']}` ({r['position']}) | {r['channel']} | "
                   f"{r['median']:.3f} | {r['peak'] / r['median']:.0f}x | {writers} |")
    return "\n".join(out)


def main(argv=None):
    import transformers
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--code-windows", type=int, default=16, help="held-out source windows besides the prose texts")
    args = p.parse_args(argv)
    transformers.utils.logging.set_verbosity_error()          # its load report for a masked-LM folder read as a model
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(args.checkpoint))
    model = transformers.AutoModel.from_pretrained(str(args.checkpoint), dtype=torch.float32).eval()
    rows = layer_stats(model, tokenizer, texts_to_run(tokenizer, args.code_windows))
    print(markdown(rows))
    worst = max(rows, key=lambda r: r["peak"] / r["median"])
    print(f"\nlargest ratio to the median: {worst['peak'] / worst['median']:.0f}x "
          f"({worst['peak']:.1f} on `{worst['token']}`, channel {worst['channel']})")


if __name__ == "__main__":
    main()
