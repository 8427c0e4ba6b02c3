"""Compare a converted .mlpackage against float32 transformers on the built-in evaluation texts.

    python diff_coreml.py ModernBERT-base-fill-mask-hadamard-512.mlpackage
    python diff_coreml.py out.mlpackage --model ./my-checkpoint --json m.json --max-kl 0.01

Each text is padded to the smallest length the package accepts (longer ones are truncated to the
largest) and run through Core ML on the Neural Engine (macOS) or the float16 emulator (elsewhere).
Reports the same metrics and JSON keys as diff_torch.py.
"""
import argparse
import sys

import numpy as np

from checkpoint import resolve_checkpoint
from evaluation import (EVAL_TEXTS, check_output_path, format_metrics, format_table, load_tokenizer, output_metrics,
                        reference_model, reference_outputs, tokenize, write_json)
from mlpackage import BACKENDS, PackageRunner, input_lengths, read_metadata
from model import FLOAT16_MAX, MASK_FILL, POOLED_TASKS, ModernBertConfig
from user_errors import UserError, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("package", help="an .mlpackage written by convert.py")
    p.add_argument("--model", help="the checkpoint it came from (default: the source in its metadata)")
    p.add_argument("--tokenizer", help="tokenizer hub id or folder (default: the one in the package metadata)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="auto: Core ML on the Neural Engine on macOS, the float16 emulator elsewhere")
    p.add_argument("--pessimistic", action="store_true",
                   help="emulator: also round the internal steps of norms, reductions and softmax to float16")
    p.add_argument("--json", metavar="PATH", help="write the metrics as JSON")
    p.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    p.add_argument("--max-kl", type=float, metavar="X", help="exit 1 when kl_mean exceeds X (for CI)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


class OverflowWatch:
    """Per op of the package: the largest |value| and the count of values float16 could not hold."""

    def __init__(self):
        self.max_abs, self.overflow = {}, {}

    def observe(self, op_name, op_type, value) -> None:
        value = np.asarray(value)
        if value.dtype.kind != "f" or value.size == 0:
            return
        finite = np.isfinite(value)
        magnitude = np.abs(value[finite])
        bad = int((~finite).sum() + (magnitude > FLOAT16_MAX).sum())
        # the additive masks (multiples of model.MASK_FILL) are not activations: leave them out of the peak
        activation = magnitude[~((magnitude >= -MASK_FILL) & (np.mod(magnitude, -MASK_FILL) == 0))]
        peak = float(activation.max()) if activation.size else 0.0
        if not finite.all():
            peak = float("inf")
        self.max_abs[op_name] = max(self.max_abs.get(op_name, 0.0), peak)
        self.overflow[op_name] = self.overflow.get(op_name, 0) + bad

    def metrics(self) -> dict:
        return {"overflow_count": sum(self.overflow.values()),
                "first_overflow": next((name for name, n in self.overflow.items() if n), None)}

    def largest(self, n: int = 8) -> list[dict]:
        top = sorted(self.max_abs.items(), key=lambda kv: -kv[1])[:n]
        return [{"op": name, "max_abs": value} for name, value in top]


def check_model_matches(meta: dict, config: ModernBertConfig, source: str, package: str) -> None:
    for key, have in (("hidden_size", config.hidden_size), ("vocab_size", config.vocab_size)):
        if key in meta and int(meta[key]) != have:
            raise UserError(f"{source} does not match {package}: {key} {have} in the checkpoint, "
                            f"{meta[key]} in the package")


def main(argv) -> int:
    args = build_parser().parse_args(argv)
    check_output_path(args.json, args.force)
    meta = read_metadata(args.package)
    lengths = input_lengths(args.package)
    task = meta["task"]
    runner = PackageRunner(args.package, args.backend, pessimistic=args.pessimistic)
    backend_name = "Core ML (CPU and Neural Engine)" if runner.backend == "coreml" else "the float16 emulator"
    print(f"running {args.package} with {backend_name}", file=sys.stderr)
    source = args.model or meta.get("source")
    ckpt = resolve_checkpoint(source)
    check_model_matches(meta, ModernBertConfig.from_dict(ckpt.config), source, args.package)
    tokenizer = load_tokenizer(args.tokenizer or (None if args.model else meta.get("tokenizer")) or ckpt.root)
    ref_model = reference_model(ckpt, task)
    output_name = meta.get("output", "logits")
    watch = OverflowWatch() if runner.backend == "emulate" else None
    refs, outs, masks, rows = [], [], [], []
    for i, text in enumerate(EVAL_TEXTS):
        n_tokens = len(tokenizer(text)["input_ids"])
        length = next((n for n in lengths if n >= n_tokens), lengths[-1])
        ids, mask = tokenize(tokenizer, [text], length, pad_to=length)
        print(f"  text {i + 1}/{len(EVAL_TEXTS)}: {min(n_tokens, length)} tokens at length {length}", file=sys.stderr)
        ref = reference_outputs(ref_model, task, ids, mask, ckpt)["output"]     # (1, S, V) or (1, L) pooled
        ours = runner.predict({"input_ids": ids.numpy(), "attention_mask": mask.numpy()},
                              observe=watch.observe if watch else None)[output_name]
        if task in POOLED_TASKS:
            ours = ours[:, 0]                                                  # (1, K, L) -> the text's row
        text_metrics = output_metrics(task, ref, ours, mask.numpy())
        rows.append({"text": i + 1, "tokens": min(n_tokens, length), "length": length, **text_metrics})
        pooled = task in POOLED_TASKS
        refs.append(ref if pooled else ref.reshape(-1, ref.shape[-1]))
        outs.append(ours if pooled else ours.reshape(-1, ours.shape[-1]))
        masks.append(np.ones(1) if pooled else mask.numpy().reshape(-1))
    if task in POOLED_TASKS:
        metrics = output_metrics(task, np.concatenate(refs), np.concatenate(outs), np.ones(len(refs)))
    else:
        flat_mask = np.concatenate(masks)[None]
        metrics = output_metrics(task, np.concatenate(refs)[None], np.concatenate(outs)[None], flat_mask)
    if watch:
        metrics.update(watch.metrics())
    metrics["backend"] = runner.backend
    columns = ["text", "tokens", "length"] + [c for c in ("kl_mean", "kl_max", "top1_agreement", "cosine_min",
                                                          "max_abs_diff", "nonfinite") if c in rows[0]]
    print(f"\n{args.package}: task {task}, rotation {meta.get('rotation')}, backend {runner.backend}, "
          f"against float32 transformers ({source})\n")
    print(format_table(rows, columns))
    if watch:
        print("\nlargest absolute values in the package's ops (float16 holds up to 65504)")
        print(format_table(watch.largest(), ["op", "max_abs"]))
    print("\nmetrics (over non-padding tokens; KL in nats per token, reference || package)")
    print(format_metrics(metrics))
    if args.json:
        write_json(args.json, {**metrics, "package": str(args.package), "model": source, "task": task,
                               "texts": rows, "largest_ops": watch.largest() if watch else []})
        print(f"\nwrote {args.json}")
    if args.max_kl is not None and not metrics.get("kl_mean", 0.0) <= args.max_kl:
        print(f"error: kl_mean {metrics.get('kl_mean')} exceeds --max-kl {args.max_kl}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run_cli(main)
