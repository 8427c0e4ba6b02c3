"""Compare model.py against transformers' ModernBERT on the built-in evaluation texts.

    python diff_torch.py answerdotai/ModernBERT-base
    python diff_torch.py ./my-checkpoint --precision float16 --rotation hadamard --json r.json

Prints a per-module table (embeddings, a global block, a local block, the encoder, the head output),
the largest absolute activation per layer (transformers' vs this model's residual stream, which is
rotated unless --rotation none) and the final metrics; --json writes the metrics, --report DIR a page
with plots (report.py), for which the unrotated model runs too.
"""
import argparse
import copy
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

from evaluation import (COSINE_TASKS, EVAL_TEXTS, check_output_path, compare_rows, format_metrics, format_table,
                        load_tokenizer, output_metrics, overflow_metrics, reference_model, reference_outputs,
                        text_disagreement, tokenize, write_json)
from checkpoint import DEFAULT_MODEL, check_rotation, resolve_checkpoint
from model import POOLED_TASKS, TASKS, ActivationProbe, ModernBert
from report import check_report_folder, write_report
from rotations import ROTATION_KINDS, rotate_model
from user_errors import run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"hub id or local folder (default {DEFAULT_MODEL})")
    p.add_argument("--task", choices=TASKS, help="default: from the checkpoint's architectures")
    p.add_argument("--precision", choices=("float32", "float16"), default="float32",
                   help="run this model in float16 (every op, as on the Neural Engine) to see what float16 does")
    p.add_argument("--rotation", choices=ROTATION_KINDS, default="hadamard",
                   help="orthogonal rotation fused into the weights (default hadamard, as convert.py)")
    p.add_argument("--seed", type=int, default=0, help="rotation seed")
    p.add_argument("--max-length", type=int, default=512, help="tokens per evaluation text at most")
    p.add_argument("--query-chunk", type=int, help="global attention in query chunks of this many tokens")
    p.add_argument("--revision", help="hub revision (branch, tag or commit)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read pytorch_model.bin when a checkpoint has no safetensors (tensors only, weights_only=True)")
    p.add_argument("--json", metavar="PATH", help="write the metrics as JSON")
    p.add_argument("--report", metavar="DIR",
                   help="write DIR/index.html: activations per layer before/after the rotation, KL per token, metrics")
    p.add_argument("--force", action="store_true", help="overwrite an existing --json file or --report folder")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def channels_last(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().squeeze(2).transpose(1, 2).numpy()          # (B, C, 1, S) -> (B, S, C)


def run_model(model: ModernBert, input_ids, attention_mask, dtype) -> tuple[dict, ActivationProbe]:
    """This model's task output and intermediates, as (B, S, C) float32 arrays in the reference basis."""
    captured = {}
    final = model.final_proj if model.final_proj is not None else model.final_norm   # the encoder's output
    hooks = [model.embeddings.register_forward_hook(lambda m, i, o: captured.__setitem__("embeddings", o[1])),
             final.register_forward_hook(lambda m, i, o: captured.__setitem__("encoder", o))]
    for idx, block in enumerate(model.layers):
        hooks.append(block.register_forward_hook(lambda m, i, o, idx=idx: captured.__setitem__(f"layers.{idx}", o)))
    with ActivationProbe() as probe, torch.no_grad():
        out = model(input_ids, attention_mask.to(dtype))
    for h in hooks:
        h.remove()
    arrays = {k: channels_last(v) for k, v in captured.items()}
    out = out[:, 0] if model.task in POOLED_TASKS else out                  # (B, K=1, L) -> (B, L)
    arrays["output"] = out.detach().float().numpy()
    return arrays, probe


def residual_to_reference(model: ModernBert, x: np.ndarray) -> np.ndarray:
    """A rotated model's residual stream Q c(r), as rows, mapped back to c(r) (see rotations.fuse)."""
    return x if model.rotation is None else x @ model.rotation["matrix"]


def centred(x: np.ndarray) -> np.ndarray:
    return x - x.mean(axis=-1, keepdims=True)


def module_rows(model: ModernBert, ref: dict, ours: dict, mask: np.ndarray) -> list[dict]:
    types = model.config.layer_types
    g = types.index("full_attention")
    picks = [("embeddings", "embeddings"), (f"layers.{g} (global)", f"layers.{g}")]
    if "sliding_attention" in types:
        l = types.index("sliding_attention")
        picks.append((f"layers.{l} (local)", f"layers.{l}"))
    rows = []
    for label, key in picks:
        reference = ref[key] if model.rotation is None else centred(ref[key])
        rows.append(compare_rows(label, reference, residual_to_reference(model, ours[key]), mask))
    rows.append(compare_rows("encoder (final norm)", ref["encoder"], ours["encoder"], mask))
    if model.task in POOLED_TASKS:
        ones = np.ones((ref["output"].shape[0], 1))
        rows.append(compare_rows("head (logits)", ref["output"][:, None], ours["output"][:, None], ones))
    else:
        rows.append(compare_rows("head (output)", ref["output"], ours["output"], mask))
    return rows


def layer_rows(model: ModernBert, ref: dict, probe: ActivationProbe, mask: np.ndarray) -> list[dict]:
    valid = mask.astype(bool)
    rows = [{"layer": "embeddings", "kind": "", "max_abs_ref": float(np.abs(ref["embeddings"][valid]).max()),
             "max_abs": probe.max_abs.get("embeddings", float("nan"))}]
    for i, kind in enumerate(model.config.layer_types):
        rows.append({"layer": i, "kind": "global" if kind == "full_attention" else "local",
                     "max_abs_ref": float(np.abs(ref[f"layers.{i}"][valid]).max()),
                     "max_abs": probe.max_abs.get(f"layers.{i}", float("nan"))})
    return rows


def write_torch_report(args, argv, ckpt, model, unrotated, metrics, probe, ref, ours, input_ids, attention_mask):
    """The --report page; runs the unrotated model (same precision, same inputs) for "before rotation"."""
    peaks = {f"after rotation ({args.rotation}): model.py, {args.precision}": probe.max_abs}
    if unrotated is None:
        peaks = {f"model.py (rotation none), {args.precision}": probe.max_abs}
    else:
        if args.query_chunk:
            unrotated.set_query_chunk(args.query_chunk)
        dtype = torch.float16 if args.precision == "float16" else torch.float32
        _, before = run_model(unrotated.to(dtype), input_ids, attention_mask, dtype)
        peaks = {f"before rotation: model.py unrotated, {args.precision}": before.max_abs, **peaks}
    mask = attention_mask.numpy()
    facts = {"checkpoint": ckpt.source, "task": model.task,
             "this model": f"model.py, {args.precision}, rotation {args.rotation} (seed {args.seed})",
             "reference": "transformers, float32",
             "texts": f"{len(EVAL_TEXTS)} evaluation texts, {int(mask.sum())} tokens, up to {mask.shape[1]} per text",
             "command": shlex.join(["python", "diff_torch.py", *argv])}
    write_report(args.report, title=f"diff_torch: {ckpt.source} ({model.task}), model.py {args.precision}, "
                                    f"rotation {args.rotation}, against transformers float32",
                 facts=facts, metrics=metrics, peaks=peaks, n_layers=model.config.num_hidden_layers,
                 disagreement=text_disagreement(model.task, ref["output"], ours["output"], mask),
                 measure="cosine" if model.task in COSINE_TASKS else "kl", pooled=model.task in POOLED_TASKS,
                 force=args.force)


def check_outputs(args, inputs) -> None:
    check_output_path(args.json, args.force, inside=inputs, script="diff_torch")
    check_output_path(args.report, args.force, inside=inputs, folder=True)
    check_report_folder(args.report, args.force)


def main(argv) -> int:
    args = build_parser().parse_args(argv)
    check_outputs(args, [args.model])
    # everything that reads the user's input first, so that bad input gets one line on stderr and nothing else
    ckpt = resolve_checkpoint(args.model, args.revision, args.allow_pickle)
    check_rotation(args.rotation, ckpt.config)                        # before the weights are loaded
    check_outputs(args, ckpt.input_paths())                           # every folder read, now that they are known
    model = ModernBert.from_checkpoint(ckpt, args.task)
    tokenizer = load_tokenizer(ckpt.root)
    transformers_model = reference_model(ckpt, model.task)
    print(f"loaded {ckpt.source} ({model.task}, {model.config.num_hidden_layers} layers)", file=sys.stderr)
    unrotated = copy.deepcopy(model) if args.report and args.rotation != "none" else None   # "before rotation"
    if args.rotation != "none":
        print(f"rotating ({args.rotation}, seed {args.seed}) ...", file=sys.stderr)
        rotate_model(model, args.rotation, args.seed)
    if args.query_chunk:
        model.set_query_chunk(args.query_chunk)
    dtype = torch.float16 if args.precision == "float16" else torch.float32
    model = model.to(dtype)
    max_length = min(args.max_length, model.config.max_position_embeddings)
    input_ids, attention_mask = tokenize(tokenizer, EVAL_TEXTS, max_length)
    mask = attention_mask.numpy()
    print(f"running transformers (float32) and this model ({args.precision}) on {len(EVAL_TEXTS)} texts, "
          f"{int(mask.sum())} tokens, up to {input_ids.shape[1]} per text ...", file=sys.stderr)
    ref = reference_outputs(transformers_model, model.task, input_ids, attention_mask, ckpt)
    del transformers_model
    ours, probe = run_model(model, input_ids, attention_mask, dtype)

    metrics = output_metrics(model.task, ref["output"], ours["output"], mask)
    metrics.update(overflow_metrics(probe))
    modules = module_rows(model, ref, ours, mask)
    layers = layer_rows(model, ref, probe, mask)
    print(f"\n{ckpt.source}: task {model.task}, {args.precision}, rotation {args.rotation}\n")
    print(format_table(modules, ["module", "max_abs_diff", "rel_diff", "cosine_min", "max_abs_ref", "max_abs"]))
    print("\nlargest absolute activation per layer (residual stream; this model's is rotated unless --rotation none)")
    print(format_table(layers, ["layer", "kind", "max_abs_ref", "max_abs"]))
    print("\nmetrics (over non-padding tokens; KL in nats per token, reference || this model)")
    print(format_metrics(metrics))
    if args.json:
        write_json(args.json, {**metrics, "model": ckpt.source, "task": model.task, "precision": args.precision,
                               "rotation": args.rotation, "seed": args.seed, "tokens": int(mask.sum()),
                               "modules": modules, "layers": layers}, force=args.force, script="diff_torch")
        print(f"\nwrote {args.json}")
    if args.report:
        write_torch_report(args, argv, ckpt, model, unrotated, metrics, probe, ref, ours, input_ids, attention_mask)
        print(f"\nwrote {Path(args.report) / 'index.html'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
