"""Compare model.py against transformers' ModernBERT on the built-in evaluation texts.

    python diff_torch.py answerdotai/ModernBERT-base
    python diff_torch.py ./my-checkpoint --precision float16 --rotation hadamard --json r.json
    python diff_torch.py ./my-checkpoint --precision float16 --rotation none --norm safe   # any float16 strategy

Prints a per-module table (embeddings, a global block, a local block, the encoder, the head output),
the largest absolute activation per layer (transformers' vs this model's residual stream, which is
rotated unless --rotation none), the final metrics and the per-token accounting (delimiter vs ordinary
tokens, the worst token); --json writes them, --report DIR a page with plots (report.py), for which the
unrotated model runs too. Texts run in bounded batches (BATCH_BYTES) and only per-token statistics are
kept, so a 256k-vocabulary model fits in memory. --max-kl / --max-score-error: exit 1 above them.
"""
import argparse
import copy
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

from modernbert_ane.evaluation import (EVAL_TEXTS, Accounting, check_gates, compare_rows, format_accounting,
                        format_gates, format_metrics, format_table, gate_exit, gate_results,
                        merge_compare_rows, output_measure, overflow_metrics, reference_model, reference_outputs,
                        residual_peaks, tokenize, valid_rows)
from modernbert_ane.checkpoint import check_rotation, load_tokenizer, resolve_checkpoint
from modernbert_ane.model import NORM_KINDS, ActivationProbe, ModernBert
from modernbert_ane.tasks import POOLED_TASKS
from modernbert_ane.report import write_report
from modernbert_ane.rotations import ROTATION_KINDS, rotate_model
from modernbert_ane.rotations.online import MLP_ROTATION_KINDS, check_mlp_rotation, rotate_mlps
from modernbert_ane import cli
from modernbert_ane.user_errors import run_cli


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    cli.add_checkpoint(p)
    cli.add_task(p)
    p.add_argument("--precision", choices=("float32", "float16"), default="float32",
                   help="run this model in float16 (every op, as on the Neural Engine) to see what float16 does")
    cli.add_strategy(p, ROTATION_KINDS, default="hadamard", norms=NORM_KINDS,
                     norm_default="the checkpoint's own forms (transformers' fused LayerNorm, the safe RMSNorm a "
                                  "rotation makes)", mlp_rotations=MLP_ROTATION_KINDS)
    p.add_argument("--max-length", type=int, default=512, help="tokens per evaluation text at most")
    cli.add_query_chunk(p)
    cli.add_report_outputs(p, "activations per layer before/after the rotation, KL per token, metrics")
    return p


def channels_last(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().squeeze(2).transpose(1, 2).numpy()          # (B, C, 1, S) -> (B, S, C)


def run_model(model: ModernBert, input_ids, attention_mask, dtype, probe: ActivationProbe) -> dict:
    """This model's task output and intermediates, as (B, S, C) float32 arrays in the reference basis;
    `probe` gathers the largest values and float16 overflows (over every call)."""
    captured = {}
    final = model.final_proj if model.final_proj is not None else model.final_norm   # the encoder's output
    hooks = [model.embeddings.register_forward_hook(lambda m, i, o: captured.__setitem__("embeddings", o[1])),
             final.register_forward_hook(lambda m, i, o: captured.__setitem__("encoder", o))]
    for idx, block in enumerate(model.layers):
        hooks.append(block.register_forward_hook(lambda m, i, o, idx=idx: captured.__setitem__(f"layers.{idx}", o)))
    with probe, torch.no_grad():
        out = model(input_ids, attention_mask.to(dtype))
    for h in hooks:
        h.remove()
    arrays = {k: channels_last(v) for k, v in captured.items()}
    out = out[:, 0] if model.task in POOLED_TASKS else out                  # (B, K=1, L) -> (B, L)
    arrays["output"] = out.detach().float().numpy()
    return arrays


# float32 rows (task output and residual stream, transformers' and ours) of one batch at most: every text in one
# padded batch for a small model, one at a time at a 256k vocabulary (a 512-token text's logits are 0.5 GB)
BATCH_BYTES = 256 * 2**20


def text_batches(lengths: list[int], row_bytes: int, budget: int | None = None) -> list[list[int]]:
    """Consecutive texts (their token counts) grouped so that a padded batch of them holds at most `budget`
    (default BATCH_BYTES) bytes at `row_bytes` a token; a text alone always runs."""
    budget = BATCH_BYTES if budget is None else budget
    batches = []
    for i, n in enumerate(lengths):
        if batches and (len(batches[-1]) + 1) * max(n, *(lengths[j] for j in batches[-1])) * row_bytes <= budget:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def row_bytes(model: ModernBert) -> int:
    """float32 bytes a token costs in a batch: the task output and the captured residual stream, twice
    (transformers' and ours)."""
    c = model.config
    width = {"fill-mask": c.vocab_size, "classify": 0, "token-classify": c.num_labels}.get(model.task, c.hidden_size)
    return 2 * 4 * (width + c.hidden_size * (c.num_hidden_layers + 2))


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


def layer_rows(model: ModernBert, ref_peaks: dict, probe: ActivationProbe) -> list[dict]:
    """Per layer: the reference's largest |value| (ref_peaks, gathered over the batches) and ours (probe)."""
    rows = [{"layer": "embeddings", "kind": "", "max_abs_ref": ref_peaks["embeddings"],
             "max_abs": probe.max_abs.get("embeddings", float("nan"))}]
    for i, kind in enumerate(model.config.layer_types):
        rows.append({"layer": i, "kind": "global" if kind == "full_attention" else "local",
                     "max_abs_ref": ref_peaks[f"layers.{i}"],
                     "max_abs": probe.max_abs.get(f"layers.{i}", float("nan"))})
    return rows


def write_torch_report(args, argv, ckpt, model, metrics, probe, before, accounting, tokens, longest, gates):
    """The --report page: `before` is the unrotated model's probe (same precision, same inputs), or None."""
    peaks = {f"after rotation ({args.rotation}): model.py, {args.precision}": probe.max_abs}
    if before is None:
        peaks = {f"model.py (rotation none), {args.precision}": probe.max_abs}
    else:
        peaks = {f"before rotation: model.py unrotated, {args.precision}": before.max_abs, **peaks}
    facts = {"checkpoint": ckpt.source, "task": model.task,
             "this model": f"model.py, {args.precision}, rotation {args.rotation} (seed {args.seed})"
                           + (f", norm {args.norm}" if args.norm else ""),
             "reference": "transformers, float32",
             "texts": f"{len(EVAL_TEXTS)} evaluation texts, {tokens} tokens, up to {longest} per text",
             "command": shlex.join(["python", "diff_torch.py", *argv])}
    write_report(args.report, title=f"diff_torch: {ckpt.source} ({model.task}), model.py {args.precision}, "
                                    f"rotation {args.rotation}, against transformers float32",
                 facts=facts, metrics=metrics, peaks=peaks, n_layers=model.config.num_hidden_layers,
                 texts=accounting.panels(), measure=accounting.tokens.measure, pooled=model.task in POOLED_TASKS,
                 output_measure=accounting.measure, gates=gates, force=args.force)


def compare_batch(model, transformers_model, unrotated, ckpt, ids, mask, dtype, probe, before, accounting, first):
    """Run one batch of texts (numbered from `first`) through both models; returns (module rows, reference
    peaks per layer) and adds each text to `accounting`."""
    ref = reference_outputs(transformers_model, model.task, ids, mask, ckpt)
    ours = run_model(model, ids, mask, dtype, probe)
    if unrotated is not None:
        run_model(unrotated, ids, mask, dtype, before)                    # only its probe is kept
    m = mask.numpy().astype(bool)
    peaks = residual_peaks(ref)                                            # (B, S)
    for b in range(len(m)):
        valid = m[b]
        encoder = {"ref_encoder": ref["encoder"][b][valid], "encoder": ours["encoder"][b][valid]}
        if model.task in POOLED_TASKS:
            accounting.add(first + b, ids[b][valid].numpy(), peaks[b][valid], ref["output"][b:b + 1],
                           ours["output"][b:b + 1], **encoder)
        else:
            accounting.add(first + b, ids[b][valid].numpy(), peaks[b][valid], valid_rows(ref["output"][b], valid),
                           valid_rows(ours["output"][b], valid))
    layer_peaks = {k: float(np.abs(v[m]).max()) for k, v in ref.items() if k == "embeddings" or k.startswith("layers.")}
    return module_rows(model, ref, ours, mask.numpy()), layer_peaks


def main(argv) -> int:
    args = build_parser().parse_args(argv)
    cli.check_report_outputs(args, [args.model], "diff_torch")
    # everything that reads the user's input first, so that bad input gets one line on stderr and nothing else
    ckpt = resolve_checkpoint(args.model, args.revision, args.allow_pickle)
    check_rotation(args.rotation, ckpt.config)                        # before the weights are loaded
    check_mlp_rotation(args.mlp_rotation, ckpt.config)
    cli.check_report_outputs(args, ckpt.input_paths(), "diff_torch")             # every folder read, now that they are known
    model = ModernBert.from_checkpoint(ckpt, args.task)
    width = model.config.num_labels if model.task in ("classify", "token-classify") else 0
    check_gates(output_measure(model.task, width), args.max_kl, args.max_score_error,
                f"the {model.task} output of {ckpt.source}")
    tokenizer = load_tokenizer(ckpt.root)
    transformers_model = reference_model(ckpt, model.task)
    print(f"loaded {ckpt.source} ({model.task}, {model.config.num_hidden_layers} layers)", file=sys.stderr)
    rotated = args.rotation != "none" or args.mlp_rotation != "none"
    unrotated = copy.deepcopy(model) if args.report and rotated else None   # "before rotation"
    if rotated:
        print(f"rotating ({args.rotation}, seed {args.seed}"
              + (f"; MLP rotation {args.mlp_rotation}" if args.mlp_rotation != "none" else "") + ") ...", file=sys.stderr)
        rotate_mlps(model, args.mlp_rotation, args.seed)           # before the residual rotation (rotations/online.py)
        rotate_model(model, args.rotation, args.seed)
    for m in (model, unrotated):
        if m is not None and args.norm:
            m.set_norm(args.norm)
    dtype = torch.float16 if args.precision == "float16" else torch.float32
    for m in (model, unrotated):
        if m is not None and args.query_chunk:
            m.set_query_chunk(args.query_chunk)
    model = model.to(dtype)
    unrotated = unrotated.to(dtype) if unrotated is not None else None
    max_length = min(args.max_length, model.config.max_position_embeddings)
    lengths = [len(ids) for ids in tokenizer(EVAL_TEXTS, truncation=True, max_length=max_length)["input_ids"]]
    batches = text_batches(lengths, row_bytes(model))
    print(f"running transformers (float32) and this model ({args.precision}) on {len(EVAL_TEXTS)} texts, "
          f"{sum(lengths)} tokens, up to {max(lengths)} per text, in {len(batches)} batch(es) ...", file=sys.stderr)
    accounting = Accounting(model.task, width or model.config.hidden_size, tokenizer, cls_pooled=model.pooling == "cls")
    probe, before = ActivationProbe(), ActivationProbe() if unrotated is not None else None
    modules, ref_peaks = None, {}
    for batch in batches:
        ids, mask = tokenize(tokenizer, [EVAL_TEXTS[i] for i in batch], max_length)
        rows, peaks = compare_batch(model, transformers_model, unrotated, ckpt, ids, mask, dtype, probe, before,
                                    accounting, batch[0] + 1)
        modules = rows if modules is None else [merge_compare_rows(a, b) for a, b in zip(modules, rows)]
        ref_peaks = {k: max(v, ref_peaks.get(k, 0.0)) for k, v in peaks.items()}
    metrics = accounting.metrics()
    metrics.update(overflow_metrics(probe))
    gates = gate_results(metrics, args.max_kl, args.max_score_error)
    layers = layer_rows(model, ref_peaks, probe)
    print(f"\n{ckpt.source}: task {model.task}, {args.precision}, rotation {args.rotation}"
          + (f", norm {args.norm}" if args.norm else "")
          + (f", MLP rotation {args.mlp_rotation}" if args.mlp_rotation != "none" else "") + "\n")
    print(format_table(modules, ["module", "max_abs_diff", "rel_diff", "cosine_min", "max_abs_ref", "max_abs"]))
    print("\nlargest absolute activation per layer (residual stream; this model's is rotated unless --rotation none)")
    print(format_table(layers, ["layer", "kind", "max_abs_ref", "max_abs"]))
    print("\nmetrics (over non-padding tokens; KL in nats per token, reference || this model)")
    print(format_metrics(metrics))
    print(format_accounting(metrics))
    if gates:
        print(format_gates(gates))
    if args.json:
        cli.write_json(args.json, {**metrics, "model": ckpt.source, "task": model.task, "precision": args.precision,
                               "rotation": args.rotation, "seed": args.seed, "norm": args.norm,
                               "mlp_rotation": args.mlp_rotation,
                               "tokens": sum(lengths),
                               "modules": modules, "layers": layers, "texts": accounting.text_rows(), "gates": gates},
                   force=args.force, script="diff_torch")
        print(f"\nwrote {args.json}")
    if args.report:
        write_torch_report(args, argv, ckpt, model, metrics, probe, before, accounting, sum(lengths), max(lengths),
                           gates)
        print(f"\nwrote {Path(args.report) / 'index.html'}")
    return gate_exit(gates)


def entry_point() -> None:
    """The console script (and `python diff_torch.py`): main with one-line errors."""
    run_cli(main)


if __name__ == "__main__":
    entry_point()
