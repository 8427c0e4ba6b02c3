"""Every float16 strategy (rotation x norm form) on checkpoints with massive activations, measured.

    python bench/bench_float16.py [--checkpoint DIR ...] [--seq-len 128] [--work DIR] [--plant P ...] [--task T ...]

Builds the planted-outlier checkpoints of tests/checkpoints.py ("small": hidden 128, 3e4 on two residual
channels of [CLS]/[SEP], made by the embedding norm or by a GeGLU unit of layer 1) for three tasks
(fill-mask, CLS-pooled classify, encoder), adds any --checkpoint folder (its own task), and runs model.py
entirely in float16 (rotations/strategy.py, as `diff_torch.py --precision float16`) against float32
transformers on the evaluation texts. Prints a Markdown table: kl_mean (fill-mask, classify), the worst
ordinary token's cosine (every task but classify: encoder output, or logits for fill-mask), the worst
cosine over all tokens (encoder), and the float16 overflows (inside norms included).
"""
import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

STRATEGIES = [("none", "fused"), ("none", "safe"), ("none", "l2eps"), ("identity", "safe"), ("hadamard", "safe")]
PLANTS = ("embedding", "mlp")
TASKS = ("fill-mask", "classify", "encoder")


def ordinary_cosine(task, reference, output, ids, mask, tokenizer) -> str:
    """The worst cosine of an ordinary token (not [CLS]/[SEP]) between the two outputs, per-token tasks only."""
    from modernbert_ane.evaluation import cosine_per_row
    from modernbert_ane.tasks import POOLED_TASKS
    if task in POOLED_TASKS:
        return "–"
    ids = ids.numpy()
    ordinary = mask.numpy().astype(bool) & (ids != tokenizer.cls_token_id) & (ids != tokenizer.sep_token_id)
    return f"{cosine_per_row(reference[ordinary], output[ordinary]).min():.5f}"


def rows_for(folder: Path, label: str, seq_len: int) -> list[str]:
    from modernbert_ane.checkpoint import resolve_checkpoint
    from modernbert_ane.evaluation import EVAL_TEXTS, load_tokenizer, reference_model, reference_outputs, tokenize
    from modernbert_ane.model import ModernBert
    from modernbert_ane.rotations.strategy import measure
    model, ckpt = ModernBert.from_pretrained(str(folder))
    tokenizer = load_tokenizer(ckpt.root)
    ids, mask = tokenize(tokenizer, EVAL_TEXTS, seq_len)
    reference = reference_outputs(reference_model(ckpt, model.task), model.task, ids, mask, ckpt)["output"]
    lines = []
    for rotation, norm in STRATEGIES:
        print(f"  {label} {model.task}: {rotation} + {norm}", file=sys.stderr, flush=True)
        row = measure(model, rotation, norm, 0, reference, ids, mask, keep_output=True)
        kl = f"{row['kl_mean']:.1e}" if "kl_mean" in row else "–"
        worst = f"{row['cosine_min']:.5f}" if "cosine_min" in row else "–"
        lines.append(f"| {label} | {model.task} | {rotation} + {norm} | {kl} | "
                     f"{ordinary_cosine(model.task, reference, row['output'], ids, mask, tokenizer)} | {worst} | "
                     f"{row['overflow_count']} |")
    return lines


def main() -> None:
    from checkpoints import build_checkpoint
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", nargs="+", default=[], metavar="DIR",
                   help="more checkpoint folders (e.g. a trained model), each measured for its own task")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per evaluation text at most (default 128)")
    p.add_argument("--work", help="folder for the built checkpoints (default: a temporary one)")
    p.add_argument("--plant", nargs="*", choices=PLANTS, default=PLANTS, help="planted checkpoints to measure")
    p.add_argument("--task", nargs="*", choices=TASKS, default=TASKS, help="their tasks")
    p.add_argument("--no-header", action="store_true", help="rows only (to join the tables of several runs)")
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="float16-"))
    if not args.no_header:
        print("| checkpoint | task | rotation + norm | kl_mean | worst ordinary-token cosine | cosine_min | "
              "overflow_count |\n|---|---|---|---|---|---|---|", flush=True)
    lines = []
    for plant in args.plant:
        for task in args.task:
            folder = work / f"small-{plant}-{task}"
            if not folder.exists():
                build_checkpoint(folder, "small", task, outliers=plant)
            lines += rows_for(folder, f"small, {plant} plant", args.seq_len)
    for folder in args.checkpoint:
        lines += rows_for(Path(folder), Path(folder).name, args.seq_len)
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
