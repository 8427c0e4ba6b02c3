"""Every float16 strategy (rotation x norm form) on checkpoints with massive activations, measured.

    python bench/bench_float16.py [--checkpoint DIR ...] [--seq-len 128] [--work DIR] [--plant P ...] [--task T ...]
                                  [--trained NAME ...] [--strategy ROTATION+NORM ...] [--compress MODE ...]

Builds the planted-outlier checkpoints of tests/checkpoints.py ("small": hidden 128, 3e4 on two residual
channels of [CLS]/[SEP], made by the embedding norm or by a GeGLU unit of layer 1) for three tasks
(fill-mask, CLS-pooled classify, encoder), the --trained variants of the bundled trained reference
(`tests/checkpoints.build_reference`: plain or planted, as a masked LM, classifier or embedder), any
--checkpoint folder (its own task), and runs model.py
entirely in float16 (rotations/strategy.py, as `diff_torch.py --precision float16`) against float32
transformers on the evaluation texts, with the weights rounded as each --compress mode stores them
(`convert.simulate_compression`, what `convert.py --rotation auto` measures). Prints a Markdown table:
kl_mean and top-1 agreement (fill-mask, classify), the worst ordinary token's cosine (per-token tasks:
encoder output, or logits for fill-mask), the worst cosine over every token (or text, for classify), the
float16 overflows (inside norms included), and which strategy `--rotation auto` picks (when every one of
its candidates was measured).
"""
import argparse
import functools
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

STRATEGIES = [("none", "fused"), ("none", "safe"), ("none", "l2eps"), ("identity", "safe"), ("hadamard", "safe"),
              ("hadamard", "l2eps")]
PLANTS = ("embedding", "mlp")
TASKS = ("fill-mask", "classify", "encoder")
TRAINED = {"reference": ("fill-mask", None), "reference-embedding-plant": ("fill-mask", "embedding"),
           "reference-mlp-plant": ("fill-mask", "mlp"), "classifier-mlp-plant": ("classify", "mlp"),
           "embedder-mlp-plant": ("embed", "mlp")}
HEADER = ("| checkpoint | task | --compress | rotation + norm | kl_mean | top-1 | worst ordinary-token cosine | "
          "cosine_min | overflow_count | auto picks |\n|---|---|---|---|---|---|---|---|---|---|")


def strategy_arg(text: str) -> tuple[str, str]:
    """"hadamard+safe" -> ("hadamard", "safe")."""
    from modernbert_ane.model import NORM_KINDS
    from modernbert_ane.rotations import ROTATION_KINDS
    rotation, _, norm = text.partition("+")
    if rotation not in ROTATION_KINDS or norm not in NORM_KINDS:
        raise argparse.ArgumentTypeError(f"'{text}' is not ROTATION+NORM ({'|'.join(ROTATION_KINDS)} + "
                                         f"{'|'.join(NORM_KINDS)})")
    return rotation, norm


def cosines(task, reference, output, ids, mask, tokenizer) -> tuple[str, str]:
    """The worst cosine of an ordinary token (not [CLS]/[SEP]; per-token tasks only) and of any row."""
    from modernbert_ane.evaluation import POOLED_TASKS, cosine_per_row
    if task in POOLED_TASKS:
        return "–", f"{cosine_per_row(reference, output).min():.5f}"
    ids, valid = ids.numpy(), mask.numpy().astype(bool)
    ordinary = valid & (ids != tokenizer.cls_token_id) & (ids != tokenizer.sep_token_id)
    return (f"{cosine_per_row(reference[ordinary], output[ordinary]).min():.5f}",
            f"{cosine_per_row(reference[valid], output[valid]).min():.5f}")


def rows_for(folder: Path, label: str, seq_len: int, strategies, modes) -> list[str]:
    from modernbert_ane.convert import simulate_compression
    from modernbert_ane.checkpoint import load_tokenizer
    from modernbert_ane.evaluation import EVAL_TEXTS, reference_model, reference_outputs, tokenize
    from modernbert_ane.model import ModernBert
    from modernbert_ane.rotations.strategy import AUTO_CANDIDATES, choose, measure
    model, ckpt = ModernBert.from_pretrained(str(folder))
    tokenizer = load_tokenizer(ckpt.root)
    ids, mask = tokenize(tokenizer, EVAL_TEXTS, seq_len)
    reference = reference_outputs(reference_model(ckpt, model.task), model.task, ids, mask, ckpt)["output"]
    embedding_gain = float(model.embeddings.norm.weight.detach().abs().max())         # as convert.py, before rotation
    lines = []
    for mode in modes:
        compress = None if mode == "none" else functools.partial(simulate_compression, mode=mode,
                                                                 embedding_gain=embedding_gain)
        rows = []
        for rotation, norm in strategies:
            print(f"  {label} {model.task} {mode}: {rotation} + {norm}", file=sys.stderr, flush=True)
            rows.append(measure(model, rotation, norm, 0, reference, ids, mask, compress, keep_output=True))
        candidates = [r for r in rows if (r["rotation"], r["norm"]) in AUTO_CANDIDATES]
        picked = choose(candidates, model.task) if len(candidates) == len(AUTO_CANDIDATES) else None
        for row in rows:
            kl = f"{row['kl_mean']:.1e}" if "kl_mean" in row else "–"
            top1 = f"{row['top1_agreement']:.3f}" if "top1_agreement" in row else "–"
            ordinary, worst = cosines(model.task, reference, row["output"], ids, mask, tokenizer)
            lines.append(f"| {label} | {model.task} | {mode} | {row['rotation']} + {row['norm']} | {kl} | {top1} | "
                         f"{ordinary} | {worst} | {row['overflow_count']} | {'yes' if row is picked else ''} |")
            print(lines[-1], file=sys.stderr, flush=True)
    return lines


def main() -> None:
    from checkpoints import build_checkpoint, build_reference
    from modernbert_ane.convert import COMPRESS_MODES
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", nargs="+", default=[], metavar="DIR",
                   help="more checkpoint folders (e.g. a trained model), each measured for its own task")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per evaluation text at most (default 128)")
    p.add_argument("--work", help="folder for the built checkpoints (default: a temporary one)")
    p.add_argument("--trained", nargs="*", choices=TRAINED, default=[],
                   help="variants of the trained reference model to measure too (task, planted mechanism)")
    p.add_argument("--plant", nargs="*", choices=PLANTS, default=PLANTS, help="planted checkpoints to measure")
    p.add_argument("--task", nargs="*", choices=TASKS, default=TASKS, help="their tasks")
    p.add_argument("--strategy", nargs="+", type=strategy_arg, default=STRATEGIES, metavar="ROTATION+NORM",
                   help="strategies to measure (default: " + " ".join(f"{r}+{n}" for r, n in STRATEGIES) + ")")
    p.add_argument("--compress", nargs="+", choices=COMPRESS_MODES, default=["none"],
                   help="weights rounded as convert.py --compress stores them (default none)")
    p.add_argument("--no-header", action="store_true", help="rows only (to join the tables of several runs)")
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="float16-"))
    if not args.no_header:
        print(HEADER, flush=True)
    lines = []
    for plant in args.plant:
        for task in args.task:
            folder = work / f"small-{plant}-{task}"
            if not folder.exists():
                build_checkpoint(folder, "small", task, outliers=plant)
            lines += rows_for(folder, f"small, {plant} plant", args.seq_len, args.strategy, args.compress)
    for name in args.trained:
        folder = work / f"trained-{name}"
        if not (folder / "config.json").exists():
            build_reference(folder, *TRAINED[name])
        lines += rows_for(folder, f"trained {name}", args.seq_len, args.strategy, args.compress)
    for folder in args.checkpoint:
        lines += rows_for(Path(folder), Path(folder).name, args.seq_len, args.strategy, args.compress)
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
