"""Compare a converted .mlpackage against float32 transformers on the built-in evaluation texts.

    python diff_coreml.py ModernBERT-base-fill-mask-hadamard-512.mlpackage
    python diff_coreml.py out.mlpackage --model ./my-checkpoint --json m.json --max-kl 0.01

Each text is padded to the smallest length the package accepts (longer ones are truncated to the
largest) and run through Core ML on the Neural Engine (macOS) or the float16 emulator (elsewhere).
Reports the same metrics and JSON keys as diff_torch.py (per token for the per-token tasks; a package's
pooled output has one row per text). --report DIR writes a page with plots (report.py): the package's
largest value per layer against model.py unrotated, and KL per token, one panel per text; and where Core ML
runs the ops when a compute plan is at hand (Core ML on macOS 14.4+, or --placement JSON on any OS).
"""
import json
import argparse
import re
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

from modernbert_ane.checkpoint import CheckpointError, load_tokenizer, resolve_checkpoint
from modernbert_ane.evaluation import (EVAL_TEXTS, Accounting, check_gates, format_accounting, format_gates,
                        format_metrics, format_table, gate_exit, gate_results, output_measure,
                        reference_model, reference_outputs, residual_peaks, tokenize, valid_rows)
from modernbert_ane.coreml.macos import compute_plan_records
from modernbert_ane.coreml.package import Package, check_token_ids, tokenizer_revision
from modernbert_ane.coreml.placement import format_placement, per_op_flops, placement_summary
from modernbert_ane.coreml.runner import PackageRunner, resolve_backend
from modernbert_ane.model import FLOAT16_MAX, MASK_FILL, ActivationProbe, ModernBert, ModernBertConfig
from modernbert_ane.tasks import POOLED_TASKS
from modernbert_ane.report import write_report
from modernbert_ane import cli
from modernbert_ane.user_errors import UserError, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    cli.add_package(p, "compare")
    cli.add_checkpoint(p, positional=False)
    cli.add_tokenizer(p)
    cli.add_backend(p)
    p.add_argument("--pessimistic", action="store_true",
                   help="emulator: also round the internal steps of norms, reductions and softmax to float16")
    p.add_argument("--placement", metavar="JSON",
                   help="where Core ML runs the ops, for the report and the JSON: bench/bench_device.py's --json, or "
                        "compute-plan records (coreml/macos.py's compute_plan_records: a list, or "
                        "{\"compute_units\": ..., \"records\": [...]}) saved on a Mac; with Core ML on macOS 14.4+ it "
                        "is read from the compiled model instead")
    cli.add_report_outputs(p, "the largest value per layer against model.py unrotated, KL per token, the metrics")
    return p


class OverflowWatch:
    """Per op of the package: the largest |value| and the count of values float16 could not hold.
    `conv_weights` (conv op name -> its weight's name) lets layer_peaks tell the layers apart."""

    def __init__(self, conv_weights: dict[str, str] | None = None):
        self.max_abs, self.overflow, self.op_type = {}, {}, {}
        self.conv_weights = conv_weights or {}

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
        self.op_type[op_name] = op_type

    def metrics(self) -> dict:
        return {"overflow_count": sum(self.overflow.values()),
                "first_overflow": next((name for name, n in self.overflow.items() if n), None)}

    def largest(self, n: int = 8) -> list[dict]:
        top = sorted(self.max_abs.items(), key=lambda kv: -kv[1])[:n]
        return [{"op": name, "max_abs": value} for name, value in top]

    def layer_peaks(self) -> dict[str, float]:
        """The largest |value| per "embeddings", "layers.i", "head", in the order the ops ran. A conv belongs
        where its weight's name says (model_layers_3_mlp_Wi_weight_to_fp16[_quantized] -> layers.3); another
        op belongs with the next conv (a layer starts with its norm), except a residual add right after a conv
        (it ends that conv's layer), ops before layer 0's first conv (layer 0 has no attention norm: they are
        the embeddings') and ops after the last conv (the head's)."""
        names = list(self.max_abs)
        groups = [weight_group(self.conv_weights[n]) if self.op_type[n] == "conv" and n in self.conv_weights
                  else None for n in names]
        next_group, following = [], "head"
        for group in reversed(groups):
            next_group.append(following)
            following = group or following
        next_group.reverse()
        peaks, in_layers = {}, False
        for j, name in enumerate(names):
            if groups[j]:
                where = groups[j]
            elif self.op_type[name] == "add" and j and groups[j - 1]:
                where = groups[j - 1]
            else:
                where = next_group[j] if in_layers or not next_group[j].startswith("layers.") else "embeddings"
            in_layers |= where.startswith("layers.")
            peaks[where] = max(peaks.get(where, 0.0), self.max_abs[name])
        return peaks


def conv_weight_names(runner: PackageRunner) -> dict[str, str]:
    """conv op name -> the name of the weight constant it reads, for OverflowWatch (emulator only)."""
    return {op: read["weight"][0] for op, read in runner.op_inputs().items() if read.get("weight")}


def weight_group(weight_name: str) -> str:
    """"embeddings", "layers.i" or "head" for a weight constant named after its module by the converter."""
    layer = re.search(r"(?:^|_)layers_(\d+)_", weight_name)
    if layer:
        return f"layers.{layer.group(1)}"
    return "embeddings" if "embeddings" in weight_name else "head"


def check_model_matches(meta: dict, config: ModernBertConfig, source: str, package: str) -> None:
    for key, have in (("hidden_size", config.hidden_size), ("vocab_size", config.vocab_size)):
        if key in meta and int(meta[key]) != have:
            raise UserError(f"{source} does not match {package}: {key} {have} in the checkpoint, "
                            f"{meta[key]} in the package")


def write_package_report(args, argv, meta, ckpt, runner, watch, before, metrics, accounting, tokens, gates,
                         placement=None, placement_source=None) -> None:
    """The --report page: the package's per-op peaks per layer (emulator only) against model.py unrotated."""
    task, rotation = meta["task"], meta.get("rotation") or "none"
    n_layers = ModernBertConfig.from_dict(ckpt.config).num_hidden_layers
    backend = ("Core ML" if runner.backend == "coreml" else
               "float16 emulator" + (" (pessimistic)" if args.pessimistic else ""))
    peaks = {"before rotation: model.py unrotated, float32": before.max_abs}
    notes = []
    if watch and rotation == "none":
        peaks["this package (rotation none), " + backend] = watch.layer_peaks()
    elif watch:
        peaks[f"after rotation ({rotation}): this package, {backend}"] = watch.layer_peaks()
    else:
        notes.append("Core ML gives no per-op values: only model.py is plotted per layer (--backend emulate adds "
                     "the package's).")
    facts = {"package": args.package, "function": meta.get("function"), "checkpoint": ckpt.source, "task": task,
             "rotation": rotation if rotation == "none" else f"{rotation} (seed {meta.get('rotation_seed')})",
             "weights": meta.get("compress"), "backend": backend, "reference": "transformers, float32",
             "texts": f"{len(EVAL_TEXTS)} evaluation texts, {tokens} tokens, each padded to a package length",
             "op placement": placement_source,
             "command": shlex.join(["python", "diff_coreml.py", *argv])}
    write_report(args.report, title=f"diff_coreml: {args.package} ({task}, rotation {rotation}), {backend}, "
                                    f"against transformers float32",
                 facts={k: v for k, v in facts.items() if v is not None}, metrics=metrics, peaks=peaks,
                 n_layers=n_layers, texts=accounting.panels(), measure=accounting.tokens.measure,
                 pooled=task in POOLED_TASKS, output_measure=accounting.measure, gates=gates, notes=notes,
                 placement=placement, force=args.force)


RECORD_KEYS = ("name", "op_type", "device")


def read_placement(path: str) -> dict:
    """--placement JSON: {"summaries": {units: placement_summary}} from bench_device.py's --json, or {"records":
    {units: [records]}} from saved compute-plan records; a one-line error for anything else."""
    try:
        doc = json.loads(Path(path).read_bytes())
    except OSError as e:
        raise UserError(f"cannot read --placement {path}: {e.strerror or e}") from e
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"--placement {path} is not JSON: {e}") from e
    if isinstance(doc, dict) and isinstance(doc.get("placement"), dict) and doc["placement"]:
        return {"summaries": doc["placement"]}                    # bench_device.py --json
    units, records = "cpu-and-ne", doc
    if isinstance(doc, dict) and "records" in doc:
        units, records = doc.get("compute_units") or units, doc["records"]
    if not (isinstance(units, str) and isinstance(records, list) and records and
            all(isinstance(r, dict) and all(isinstance(r.get(k), (str, type(None))) for k in RECORD_KEYS)
                and isinstance(r.get("name"), str) and isinstance(r.get("op_type"), str) for r in records)):
        raise UserError(f"--placement {path} holds neither bench_device.py's --json (with placement) nor compute-plan "
                        f"records (a list of {{\"name\", \"op_type\", \"device\"}})")
    return {"records": {units: records}}


def placement_summaries(args, meta: dict, runner: PackageRunner, lengths: list[int]) -> tuple[dict, str | None]:
    """(compute units -> placement_summary, where it came from): from --placement, or from the compute plan of the
    compiled model Core ML just loaded (macOS 14.4+), of the function that runs the largest length; ({}, None)
    when there is none."""
    function = meta["length_functions"][lengths[-1]]
    if args.placement:
        given = read_placement(args.placement)
        if "summaries" in given:
            return given["summaries"], f"{args.placement} (bench_device.py)"
        flops = per_op_flops(runner.package, function, lengths[-1])
        return ({units: placement_summary(records, flops) for units, records in given["records"].items()},
                f"{args.placement} (compute-plan records)")
    compiled = (runner.load_report or {}).get("compiled_path")
    if runner.backend != "coreml" or not compiled:                # the emulator, or --no-cache: no compiled copy
        return {}, None
    try:
        records = compute_plan_records(compiled, args.compute_units, function)
    except ValueError as e:                                       # coremltools: MLComputePlan needs macOS 14.4+
        print(f"no op placement ({e})", file=sys.stderr)
        return {}, None
    return ({args.compute_units: placement_summary(records, per_op_flops(runner.package, function, lengths[-1]))},
            f"Core ML's compute plan of {compiled}")


def running_line(package: str, backend: str, described: str) -> str:
    """stderr's first progress line: 'running out.mlpackage with Core ML (all, loaded from the cache ...)'."""
    return f"running {package} with {described if backend == 'coreml' else 'the ' + described}"


def format_placement_section(placement: dict, source: str) -> str:
    """The placement as diff_coreml.py prints it: where it came from, then each compute-unit setting's summary."""
    return "\n".join([f"where Core ML runs the ops ({source})",
                      *(format_placement(units, summary) for units, summary in placement.items())])


def main(argv) -> int:
    args = build_parser().parse_args(argv)
    resolve_backend(args.backend)                       # --backend coreml off macOS: refused before any work
    cli.check_report_outputs(args, [args.package, args.model, args.tokenizer, args.placement], "diff_coreml")
    package = Package(args.package)                     # read once: the metadata, the lengths, the runner's spec
    meta = package.metadata(args.function)
    lengths = package.lengths(meta["function"])
    task = meta["task"]
    width = len(meta.get("labels") or []) if task in ("classify", "token-classify") else 0
    check_gates(output_measure(task, width), args.max_kl, args.max_score_error, f"the {task} output of {args.package}")
    if args.placement:
        read_placement(args.placement)                  # bad input: refused before any work
    runner = PackageRunner(package, args.backend, pessimistic=args.pessimistic, function=meta["function"],
                           compute_units=args.compute_units, use_cache=not args.no_cache)
    source = args.model or meta.get("source")
    try:
        # the commit the package was converted from (metadata), not whatever the hub's main branch holds today
        ckpt = resolve_checkpoint(source, revision=None if args.model else meta.get("revision"),
                                  allow_pickle=args.allow_pickle)
    except CheckpointError as e:
        if args.model:
            raise
        raise CheckpointError(f"{e} (the checkpoint {args.package} was converted from, by its metadata); "
                              f"pass --model with its folder") from e
    check_model_matches(meta, ModernBertConfig.from_dict(ckpt.config), source, args.package)
    tokenizer_source = args.tokenizer or (None if args.model else meta.get("tokenizer")) or ckpt.root
    cli.check_report_outputs(args, [args.package, *ckpt.input_paths(), tokenizer_source, args.placement],
                             "diff_coreml")                                       # every input, now known
    tokenizer = load_tokenizer(tokenizer_source,
                               revision=None if args.tokenizer or args.model else tokenizer_revision(meta))
    ref_model = reference_model(ckpt, task)
    check_token_ids([tokenizer(t)["input_ids"] for t in EVAL_TEXTS], meta.get("vocab_size"), args.package,
                    lambda i: f"evaluation text {i + 1}")                # another --tokenizer's ids: refused
    print(running_line(args.package, runner.backend, runner.describe()), file=sys.stderr)   # input read: no more errors
    output_name = meta.get("output", "logits")
    watch = OverflowWatch(conv_weight_names(runner)) if runner.backend == "emulate" else None
    unrotated = ModernBert.from_checkpoint(ckpt, task) if args.report else None      # "before rotation"
    before = ActivationProbe()
    accounting = None
    rows = []
    for i, text in enumerate(EVAL_TEXTS):
        n_tokens = len(tokenizer(text)["input_ids"])
        length = next((n for n in lengths if n >= n_tokens), lengths[-1])
        ids, mask = tokenize(tokenizer, [text], length, fixed_length=True)
        print(f"  text {i + 1}/{len(EVAL_TEXTS)}: {min(n_tokens, length)} tokens at length {length}", file=sys.stderr)
        ref = reference_outputs(ref_model, task, ids, mask, ckpt)                # 'output': (1, S, V) or (1, L)
        ours = runner.predict({"input_ids": ids.numpy(), "attention_mask": mask.numpy()},
                              observe=watch.observe if watch else None)[output_name]
        valid = mask.numpy()[0].astype(bool)
        if accounting is None:                       # the package's own width: one-label heads are told by it
            accounting = Accounting(task, ours.shape[-1], tokenizer)
        if task in POOLED_TASKS:                      # one row per text: no per-token output to split
            accounting.add(i + 1, ids[0][valid].numpy(), residual_peaks(ref)[0][valid], ref["output"], ours[:, 0])
        else:
            accounting.add(i + 1, ids[0][valid].numpy(), residual_peaks(ref)[0][valid],
                           valid_rows(ref["output"][0], valid), valid_rows(ours[0], valid))
        rows.append({"text": i + 1, "tokens": min(n_tokens, length), "length": length})
        del ref, ours
        if args.report:
            with before, torch.no_grad():
                unrotated(ids, mask.float())
    rows = [{**row, **{k: v for k, v in text_row.items() if k not in row}}
            for row, text_row in zip(rows, accounting.text_rows())]
    metrics = accounting.metrics()
    if watch:
        metrics.update(watch.metrics())
    metrics["backend"] = runner.backend
    gates = gate_results(metrics, args.max_kl, args.max_score_error)
    columns = ["text", "tokens", "length"] + [c for c in ("kl_mean", "kl_max", "top1_agreement", "cosine_min",
                                                          "score_abs_error_max", "max_abs_diff", "nonfinite")
                                              if c in rows[0]]
    print(f"\n{args.package}: task {task}, rotation {meta.get('rotation')}, backend {runner.backend}, "
          f"against float32 transformers ({source})\n")
    print(format_table(rows, columns))
    if watch:
        print("\nlargest absolute values in the package's ops (float16 holds up to 65504)")
        print(format_table(watch.largest(), ["op", "max_abs"]))
    print("\nmetrics (over non-padding tokens; KL in nats per token, reference || package)")
    print(format_metrics(metrics))
    print(format_accounting(metrics))
    if gates:
        print(format_gates(gates))
    placement, placement_source = placement_summaries(args, meta, runner, lengths)
    if placement:
        print("\n" + format_placement_section(placement, placement_source))
    if args.json:
        cli.write_json(args.json, {**metrics, "package": str(args.package), "model": source,
                               "function": meta["function"], "task": task, "texts": rows,
                               "largest_ops": watch.largest() if watch else [], "gates": gates,
                               "placement": placement},
                   force=args.force, script="diff_coreml")
        print(f"\nwrote {args.json}")
    if args.report:
        tokens = sum(int(row["tokens"]) for row in rows)
        write_package_report(args, argv, meta, ckpt, runner, watch, before, metrics, accounting, tokens, gates,
                             placement, placement_source)
        print(f"\nwrote {Path(args.report) / 'index.html'}")
    return gate_exit(gates)


def entry_point() -> None:
    """The console script (and `python diff_coreml.py`): main with one-line errors."""
    run_cli(main)


if __name__ == "__main__":
    entry_point()
