"""Convert a ModernBERT checkpoint to a Core ML ML Program (.mlpackage, float16) for the Neural Engine.

    python convert.py                                   # answerdotai/ModernBERT-base, 512 tokens, float16 strategy measured
    python convert.py ./my-checkpoint --seq-len 128 512 --task classify -o classifier.mlpackage

Inputs: input_ids (1, S) int32 and attention_mask (1, S) int32 (1 = token, 0 = padding); every mask
is built inside the graph. The float16 strategy (rotation and norm form) is chosen by measurement unless
forced (--rotation auto, rotations/strategy.py). Several --seq-len values give one package accepting each of them
(enumerated shapes, the flexible-shape kind the Neural Engine runs), or with --shapes functions one function
per length, sharing the weights, which predict.py picks by the input's length. After saving, the package is
run by the float16 emulator (or Core ML on macOS) and compared with the float32 model: below the
threshold the conversion fails and nothing is written.
"""
import argparse
import functools
import os
import re
import sys
import uuid
import json
import warnings
from pathlib import Path

import numpy as np
import torch

from modernbert_ane.coreml.readiness import Readiness
from modernbert_ane.checkpoint import check_rotation, load_tokenizer, read_prompts, resolve_checkpoint
from modernbert_ane.evaluation import (EVAL_TEXTS, cosine_metrics, distribution_metrics,
                        reference_model, reference_outputs, tokenize)
from modernbert_ane import __version__
from modernbert_ane.coreml.package import Package, package_inputs, written_by_convert
from modernbert_ane.coreml.runner import PackageRunner
from modernbert_ane.model import NORM_KINDS, ModernBert, local_attention_bytes
from modernbert_ane.tasks import COSINE_TASKS, OUTPUT_NAMES, POOLED_TASKS, SPECS
from modernbert_ane.output_files import Ours, check_output as check_output_file, publish, staging_folder
from modernbert_ane.coreml.cost import metadata_entry, package_costs
from modernbert_ane.coreml.quiet_coremltools import import_coremltools
from modernbert_ane.rotations import ROTATION_KINDS, rotate_model
from modernbert_ane.rotations.fuse import LEARNED, SEEDED_KINDS, float16_convs, kept_float16
from modernbert_ane.rotations.learned import DEFAULT_STEPS
from modernbert_ane.rotations.online import MLP_ROTATION_KINDS, check_mlp_rotation, rotate_mlps
from modernbert_ane import cli
from modernbert_ane.user_errors import UserError, run_cli, writing

MASK_DESCRIPTION = {False: "1 for a token, 0 for padding, int32",
                    True: "which packed text a token belongs to (1..K, texts contiguous and in order), 0 for "
                          "padding, int32; a single text is all 1s"}
# target -> (coremltools target, has iOS 18 / macOS 15 features). Those features: enumerated shapes on two
# inputs, multi-function packages, per-grouped-channel palettes. Without them: one length, one task, int8.
TARGETS = {"macOS15": ("macOS15", True), "iOS18": ("iOS18", True), "macOS14": ("macOS14", False),
           "iOS17": ("iOS17", False)}
SHAPES = ("enumerated", "functions")
COMPRESS_MODES = ("none", "int8", "palettize4", "palettize6", "palettize8", "w8a8")
PALETTE_GROUP = 32              # output channels sharing one palette (per-grouped-channel: iOS 18 / macOS 15)
CHECK_MIN_TOP1 = 0.9            # of the package against this model in float32, on the check texts
CHECK_MIN_COSINE = 0.99


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    cli.add_checkpoint(p)
    p.add_argument("--seq-len", type=int, nargs="+", default=[512], metavar="N",
                   help="sequence length(s) the package accepts (default 512)")
    p.add_argument("--shapes", choices=SHAPES, default="enumerated",
                   help="several --seq-len: enumerated (default: one function accepting each length, "
                        "ct.EnumeratedShapes) or functions (one fixed-shape function per length, named "
                        "fill_mask_128, fill_mask_512, ..., the weights stored once; predict.py picks the "
                        "smallest length that fits)")
    cli.add_task(p, several=True)
    cli.add_strategy(p, ("auto",) + ROTATION_KINDS + (LEARNED,), default="auto", norms=NORM_KINDS,
                     norm_default="measured with --rotation auto, safe otherwise", mlp_rotations=MLP_ROTATION_KINDS)
    p.add_argument("--rotation-steps", type=int, default=DEFAULT_STEPS, metavar="N",
                   help=f"--rotation learned: optimizer steps on the calibration texts (default {DEFAULT_STEPS})")
    p.add_argument("--deployment-target", choices=sorted(TARGETS), default="macOS15",
                   help="minimum OS (default macOS15 = iOS18 ops; macOS14/iOS17 only for a single --seq-len)")
    p.add_argument("--local-attention", choices=("auto", "masked", "blockwise"), default="auto",
                   help="sliding-window layers: blockwise (O(S*window), lengths multiples of the window radius) "
                        "or masked (an S x S mask); auto: blockwise when it fits and the S x S form writes more bytes "
                        "(from 832 tokens at base size)")
    cli.add_query_chunk(p)
    p.add_argument("--max-texts", type=int, default=1, metavar="K",
                   help="pack up to K texts into one prediction (attention_mask carries segment ids; default 1)")
    p.add_argument("--compress", choices=COMPRESS_MODES, default="none",
                   help="int8: per-channel symmetric int8 weights (about half the size); palettizeN: 2^N-entry "
                        "k-means palettes per group of 32 output channels (N/16 of the size; macOS15/iOS18); "
                        "convs and token embeddings; w8a8: int8 weights and int8 activations (one scale per "
                        "tensor, calibrated with model.py) at every int8 conv's input (iOS17/macOS14 ops); default "
                        "none (float16 weights)")
    cli.add_tokenizer(p)
    p.add_argument("-o", "--output", help="output .mlpackage (default: named from model, task, rotation (auto: "
                                          "'auto', whatever was chosen), norm when given, MLP rotation when "
                                          "given, lengths)")
    cli.add_force(p)
    cli.add_backend(p, check=True)
    p.add_argument("--skip-check", action="store_true", help="do not run the package after converting")
    return p


def default_output_name(source: str, tasks: list[str], rotation: str, seed: int, lengths: list[int],
                        compress: str = "none", norm: str | None = None, shapes: str = "enumerated",
                        mlp_rotation: str = "none") -> str:
    """Named from the options, never from a measurement (known before any work, the same on every run):
    --rotation auto names "auto"; --norm appears only when given; --mlp-rotation only when not none, as
    "mlp-<kind>" after the norm; --shapes functions (several lengths) as "functions" before the lengths."""
    slug = re.sub(r"[^\w.-]+", "-", Path(source.rstrip("/")).name) or "model"
    seed_part = f"-seed{seed}" if rotation in SEEDED_KINDS + ("auto",) and seed else ""
    norm_part = f"-{norm}" if norm else ""
    norm_part += "" if mlp_rotation == "none" else f"-mlp-{mlp_rotation}"
    compress_part = "" if compress == "none" else f"-{compress}"
    shapes_part = "-functions" if shapes == "functions" and len(lengths) > 1 else ""
    return (f"{slug}-{'+'.join(tasks)}-{rotation}{seed_part}{norm_part}{compress_part}{shapes_part}-"
            f"{'-'.join(map(str, lengths))}.mlpackage")


def function_name(task: str) -> str:
    """A multi-function package's function for a task (function names are identifiers: fill_mask)."""
    return SPECS[task].function


def package_function(task: str, n_tasks: int) -> str | None:
    """The function to address a task by in a package of `n_tasks` tasks: None (the only one) for one task.
    In a --shapes functions package this names the task's head, whose functions run one length each."""
    return function_name(task) if n_tasks > 1 else None


def length_groups(lengths: list[int], shapes: str) -> list[list[int]]:
    """The lengths each function of a task accepts: all of them in one (enumerated shapes), or one each."""
    return [[n] for n in lengths] if shapes == "functions" else [lengths]


def package_layout(tasks: list[str], lengths: list[int], shapes: str) -> dict:
    """function name -> (task, the lengths it accepts), tasks in the given order, lengths ascending; the name is
    None for a package of one function ("main"). Enumerated shapes or one length keep the names they always
    had (main, or fill_mask, embed, ...); --shapes functions with several lengths: fill_mask_128, fill_mask_512."""
    groups = length_groups(lengths, shapes)
    if len(tasks) == 1 and len(groups) == 1:
        return {None: (tasks[0], lengths)}
    return {function_name(task) + (f"_{group[0]}" if len(groups) > 1 else ""): (task, group)
            for task in tasks for group in groups}


def default_function(layout: dict) -> str | None:
    """The package's default function: the first task at its largest length (the shape every input fits)."""
    first_task = next(iter(layout.values()))[0]
    return max((name for name, (task, _) in layout.items() if task == first_task), key=lambda n: layout[n][1][-1])


def validate(args) -> list[int]:
    lengths = sorted(set(args.seq_len))
    target, recent = args.deployment_target, TARGETS[args.deployment_target][1]
    if args.task and len(set(args.task)) < len(args.task):
        raise UserError(f"--task lists a task twice: {' '.join(args.task)}")
    if args.task and len(args.task) > 1 and not recent:
        raise UserError(f"several --task values make a multi-function package, which needs "
                        f"--deployment-target macOS15 or iOS18 (not {target})")
    if args.compress.startswith("palettize") and not recent:
        raise UserError(f"--compress {args.compress} stores one palette per group of channels, which needs "
                        f"--deployment-target macOS15 or iOS18 (not {target}); --compress int8 runs on {target}")
    if args.rotation == LEARNED and args.compress != "w8a8":
        raise UserError("--rotation learned minimizes the W8A8 error: it needs --compress w8a8")
    if args.compress == "w8a8" and args.rotation == "auto":       # auto measures float16 strategies, not int8 ones
        raise UserError("--compress w8a8 needs a forced --rotation (none, identity, hadamard, random or learned; "
                        "README: W8A8)")
    if args.rotation_steps < 0:
        raise UserError("--rotation-steps must be 0 or more")
    if min(lengths) < 2:
        raise UserError("--seq-len must be at least 2 (room for [CLS] and [SEP])")
    if len(lengths) > 128:
        raise UserError("at most 128 sequence lengths fit in one package (Core ML's enumerated-shapes limit)")
    if len(lengths) > 1 and not recent:
        need = ("a function per length (a multi-function package)" if args.shapes == "functions"
                else "enumerated shapes on two inputs")
        raise UserError(f"several --seq-len values need {need}, which need "
                        f"--deployment-target macOS15 or iOS18 (not {args.deployment_target})")
    if args.query_chunk is not None and (args.query_chunk < 1 or len(lengths) > 1):
        raise UserError("--query-chunk needs a positive size and a single --seq-len")
    if not 1 <= args.max_texts <= min(lengths) // 2:
        raise UserError(f"--max-texts must be between 1 and {min(lengths) // 2} (each text needs [CLS] and [SEP])")
    return lengths


def local_attention_kind(choice: str, config, lengths: list[int]) -> str:
    """auto: blockwise where it fits (every length a multiple of the radius) and the S x S form would write
    more bytes at the largest length (model.local_attention_bytes; the largest length bounds memory)."""
    radius = config.window_radius
    fits = all(n % radius == 0 for n in lengths)
    if choice == "blockwise" and not fits:
        raise UserError(f"--local-attention blockwise needs every --seq-len to be a multiple of the window "
                        f"radius {radius}")
    if choice == "auto":
        sizes = {form: local_attention_bytes(form, max(lengths), config.hidden_size, config.num_attention_heads,
                                             radius) for form in ("masked", "blockwise")}
        return "blockwise" if fits and sizes["masked"] > sizes["blockwise"] else "masked"
    return choice


OURS = Ours(written_by_convert, "a package written by convert.py")       # what --force may replace


def check_output(output: Path, inputs, force: bool) -> None:
    if output.suffix != ".mlpackage":
        raise UserError(f"output must end in .mlpackage: {output}")
    check_output_file(output, force, inputs=inputs, folder=True, ours=OURS)


class TraceWrapper(torch.nn.Module):
    """The traced signature: int32 ids and mask in, the task's output tensor out."""

    def __init__(self, model: ModernBert):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids, attention_mask)


def trace(model: ModernBert, length: int):
    example = (torch.zeros(1, length, dtype=torch.int32), torch.ones(1, length, dtype=torch.int32))
    with torch.no_grad():
        return torch.jit.trace(TraceWrapper(model).eval(), example, check_trace=False)


DROPPED_PASSES = ["common::reduce_transposes"]


def conversion_passes():
    """coremltools' default MIL passes less `reduce_transposes`: model.py emits no transposes it could fold
    (tests/test_convert.py::test_dropped_passes_would_change_nothing), and on a base-size graph (~12,000
    ops) it spends 13 s of a 58 s conversion finding that out."""
    ct = import_coremltools()
    passes = ct.PassPipeline.DEFAULT                                   # a new pipeline on each access
    passes.remove_passes(DROPPED_PASSES)
    return passes


def to_mlprogram(traced, task: str, lengths: list[int], target: str, passes=None):
    """The ML Program of a traced model (float16), with `passes` (default: conversion_passes())."""
    ct = import_coremltools()
    if len(lengths) == 1:
        shape = (1, lengths[0])
    else:
        shape = ct.EnumeratedShapes(shapes=[[1, n] for n in lengths], default=[1, lengths[-1]])
    inputs = [ct.TensorType(name="input_ids", shape=shape, dtype=np.int32),
              ct.TensorType(name="attention_mask", shape=shape, dtype=np.int32)]
    return ct.convert(traced, inputs=inputs, outputs=[ct.TensorType(name=OUTPUT_NAMES[task])],
                      convert_to="mlprogram", compute_precision=ct.precision.FLOAT16,
                      minimum_deployment_target=getattr(ct.target, TARGETS[target][0]),
                      compute_units=ct.ComputeUnit.CPU_AND_NE, skip_model_load=True,
                      pass_pipeline=passes or conversion_passes())


EMBEDDING_GAIN_LIMIT = 50.0     # above this embedding-norm weight, int8 token embeddings lose the outlier tokens


def kmeans_palette(weight: np.ndarray, nbits: int, iterations: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """A 2**nbits-entry palette for `weight` by 1-D k-means and each value's index into it. Lloyd's
    iterations on the sorted values, started at evenly spaced quantiles: deterministic, no random restarts
    (coremltools' own k-means needs scikit-learn). In 1-D each cluster is a run of the sorted values, so an
    iteration finds the runs' ends (k binary searches) and their sums from one cumulative sum: O(k log n),
    not O(n); a base-size model palettizes ~5,800 groups of 24-37k values."""
    values = np.asarray(weight, dtype=np.float64).reshape(-1)
    ordered = np.sort(values)
    cumulative = np.concatenate([[0.0], np.cumsum(ordered)])
    k = 1 << nbits
    centres = np.quantile(ordered, (np.arange(k) + 0.5) / k)
    for _ in range(iterations):
        # a value belongs to the nearest centre: cluster j holds the values in (mid[j-1], mid[j]]
        ends = np.concatenate([[0], np.searchsorted(ordered, (centres[1:] + centres[:-1]) / 2, side="right"),
                               [len(ordered)]])
        counts, sums = np.diff(ends), cumulative[ends[1:]] - cumulative[ends[:-1]]
        updated = np.sort(np.where(counts > 0, sums / np.maximum(counts, 1), centres))
        if np.array_equal(updated, centres):
            break
        centres = updated
    palette = centres.astype(weight.dtype)                          # what the package stores
    stored = palette.astype(np.float64)
    indices = np.searchsorted((stored[1:] + stored[:-1]) / 2, values)
    return palette, indices.astype(np.uint8)


def compression_config(mode: str):
    """coremltools' op config for a --compress mode."""
    import coremltools.optimize.coreml as cto
    if mode == "int8":
        return cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel")
    return cto.OpPalettizerConfig(mode="custom", lut_function=functools.partial(kmeans_palette,
                                                                                nbits=int(mode[len("palettize"):])),
                                  granularity="per_grouped_channel", group_size=PALETTE_GROUP)


def compress_weights(mlmodel, model: ModernBert, mode: str, embedding_gain: float):
    """Quantize (int8) or palettize the weights of convs and the token-embedding gather. Kept in float16:
    the RoPE tables (read by gather in packing packages: exact tables, not learned weights) and the two
    C x C convs the rotation adds (`embeddings.proj` carries the embedding norm's weight, thousands on the
    massive channels: one int8 scale per output row, or one palette per group of rows, would round every
    other entry of the row to zero). The token embeddings stay float16 too when the embedding norm's
    weight is large (checkpoints with massive activations): the norm multiplies their rounding error by
    that weight, thousands on the massive channels; a tied decoder reads the same constant
    (ModernBert.tied_decoder), so it stays float16 with them (still smaller than a float16 table plus an
    int8 decoder)."""
    import coremltools.optimize.coreml as cto
    ops = mlmodel._mil_program.functions["main"].operations
    keep = {op.name: None for op in ops if op.op_type == "gather"
            and tuple(op.inputs["x"].shape) == (model.config.max_position_embeddings, model.config.head_dim)}
    if embedding_gain > EMBEDDING_GAIN_LIMIT:
        tied = " (and the tied decoder, which reads the same constant)" if model.tied_decoder else ""
        print(f"      token embeddings{tied} kept in float16: the embedding norm's weight reaches "
              f"{embedding_gain:.0f}", file=sys.stderr)
        tables = [op.inputs["x"] for op in ops if op.op_type == "gather"
                  and tuple(op.inputs["x"].shape) == (model.config.vocab_size, model.config.hidden_size, 1, 1)]
        keep.update({child.name: None for table in tables for child in table.child_ops})   # gather and tied conv
    kept = float16_convs(model)                           # the rotation's two convs, the online MLP rotations
    keep.update({op.name: None for op in ops if op.op_type == "conv"
                 and any(conv.replace(".", "_") in op.inputs["weight"].name for conv in kept)})
    config = compression_config(mode)                     # one object: the tied table's gather and conv must agree
    config = cto.OptimizationConfig(op_type_configs={"conv": config, "gather": config}, op_name_configs=keep)
    if mode == "int8":
        return cto.linear_quantize_weights(mlmodel, config)
    return cto.palettize_weights(mlmodel, config)


def simulate_compression(model: ModernBert, mode: str, embedding_gain: float) -> None:
    """Round model.py's weights (in place) the way `--compress mode` stores them, so the float16 strategy is
    measured with them: the weights compress_weights compresses (every conv but the rotation's two, the token
    embeddings and a tied decoder unless the embedding norm's weight is large), int8 per output channel, symmetric; palettes from
    kmeans_palette per group of PALETTE_GROUP output channels (rows). A simulation of coremltools' rounding
    (its int8 range and scales may differ in the last bit): good enough to rank strategies."""
    decoder = embedding_gain > EMBEDDING_GAIN_LIMIT and model.tied_decoder       # it reads the embeddings' constant
    weights = [m.weight for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)
               and not kept_float16(name) and not (decoder and name == "decoder")]
    if embedding_gain <= EMBEDDING_GAIN_LIMIT:
        weights.append(model.embeddings.tok_embeddings.weight)
    for weight in weights:
        rows = weight.detach().reshape(weight.shape[0], -1).numpy().astype(np.float16)   # (out, in): as stored
        weight.data = torch.from_numpy(compressed_rows(rows, mode).astype(np.float32)).reshape(weight.shape)


def compressed_rows(rows: np.ndarray, mode: str) -> np.ndarray:
    """(out, in) float16 weights as --compress `mode` rounds them (see simulate_compression)."""
    if mode == "int8":
        scale = np.abs(rows.astype(np.float32)).max(axis=1, keepdims=True) / 127
        scale = np.where(scale > 0, scale, 1.0)
        return np.clip(np.round(rows / scale), -127, 127) * scale
    nbits, out = int(mode[len("palettize"):]), np.empty(rows.shape, np.float32)
    for start in range(0, rows.shape[0], PALETTE_GROUP):
        palette, indices = kmeans_palette(rows[start:start + PALETTE_GROUP], nbits)
        out[start:start + PALETTE_GROUP] = palette[indices].reshape(rows[start:start + PALETTE_GROUP].shape)
    return out


def strategy_candidates(norm: str | None) -> list[tuple[str, str]]:
    """What --rotation auto measures: rotations/strategy.py's candidates, or both rotations with a given --norm."""
    from modernbert_ane.rotations.strategy import AUTO_CANDIDATES
    return list(AUTO_CANDIDATES) if norm is None else [("none", norm), ("hadamard", norm)]


def choose_strategy(model: ModernBert, reference_model, ckpt, tokenizer, args, lengths: list[int],
                    embedding_gain: float):
    """(chosen, rows): every candidate strategy measured on the evaluation texts at the package's largest
    length (model.py float16 against `reference_model`, float32 transformers; compressed weights simulated),
    the best chosen."""
    from modernbert_ane.rotations import NoHadamardConstructionError, strategy
    ids, mask = tokenize(tokenizer, EVAL_TEXTS, min(lengths[-1], model.config.max_position_embeddings))
    reference = reference_outputs(reference_model, model.task, ids, mask, ckpt)["output"]
    compress = None if args.compress == "none" else functools.partial(
        simulate_compression, mode=args.compress, embedding_gain=embedding_gain)
    rows = []
    for rotation, norm in strategy_candidates(args.norm):
        try:
            rows.append(strategy.measure(model, rotation, norm, args.seed, reference, ids, mask, compress))
        except NoHadamardConstructionError:          # a hidden size with no Hadamard construction: not a candidate
            continue
    return strategy.choose(rows, model.task), rows


def task_metadata(model: ModernBert, ckpt) -> dict:
    """What a package (or one function of it) declares about its task: output, labels, pooling, the conv inputs
    W8A8 left float16."""
    cfg, task = model.config, model.task
    labels = None
    if task in ("classify", "token-classify"):
        id2label = ckpt.config.get("id2label") or {str(i): f"LABEL_{i}" for i in range(cfg.num_labels)}
        labels = [id2label[str(i)] if str(i) in id2label else id2label[i] for i in range(cfg.num_labels)]
        labels = [v if isinstance(v, str) else json.dumps(v) for v in labels]      # {"0": 0}: the label "0"
    problem = ckpt.config.get("problem_type") or (
        "regression" if task == "classify" and cfg.num_labels == 1 else "single_label_classification")
    embedding_dim = None
    if task == "embed":
        dense = model.sentence_head.dense
        embedding_dim = dense[-1].out_channels if len(dense) else cfg.hidden_size
    return {"task": task, "output": OUTPUT_NAMES[task], "labels": labels,
            "problem_type": problem if task == "classify" else None,
            "pooling": model.pooling if task in POOLED_TASKS else None, "embedding_dim": embedding_dim,
            "normalized": model.sentence_head.normalize if task == "embed" else None,
            "w8a8_float16_inputs": model.float16_inputs}        # None (not stored) unless W8A8 left some float16


def package_metadata(models: dict, layout: dict, ckpt, tokenizer, tokenizer_source: str, args, lengths,
                     costs: dict, strategy: dict | None = None) -> dict:
    """The package's metadata; a multi-function package keeps the per-function part under "functions" (with
    --shapes functions also the function's "head", the task's name every length answers to, and its
    "seq_lengths"). layout: package_layout(). costs: function name -> package_cost.package_costs() of it.
    `strategy`: how --rotation auto chose (the candidates' measurements), None when forced."""
    first = next(iter(models.values()))
    cfg = first.config
    meta = {"source": ckpt.source, "revision": ckpt.revision, "tokenizer": tokenizer_source,
            "rotation": args.rotation, "rotation_seed": args.seed if args.rotation in SEEDED_KINDS else None,
            "mlp_rotation": first.mlp_rotation,                 # None (not stored) without --mlp-rotation
            "norm": args.norm, "strategy": strategy,
            "seq_lengths": lengths, "shapes": args.shapes, "version": __version__, "hidden_size": cfg.hidden_size,
            "vocab_size": cfg.vocab_size, "deployment_target": args.deployment_target, "compute_units": "CPU_AND_NE",
            "compress": args.compress, "local_attention": "blockwise" if first.blockwise else "masked",
            "pad_token_id": tokenizer.pad_token_id, "cls_token_id": tokenizer.cls_token_id,
            "sep_token_id": tokenizer.sep_token_id, "mask_token_id": tokenizer.mask_token_id,
            "max_texts": first.max_texts, "prompts": read_prompts(ckpt.root)}
    per_task = {task: task_metadata(model, ckpt) for task, model in models.items()}
    if len(layout) == 1:
        return {**meta, **per_task[first.task], "cost": metadata_entry(costs[None])}
    functions = {}
    for name, (task, group) in layout.items():
        functions[name] = {**per_task[task], "cost": metadata_entry(costs[name])}
        if len(group) < len(lengths):                   # --shapes functions: one of the head's lengths
            functions[name].update(head=function_name(task), seq_lengths=group)
    return {**meta, "functions": functions}


def describe_package(package: Package, models: dict, layout: dict, metadata: dict, ckpt, args, lengths) -> None:
    """Write the descriptions Xcode shows and our metadata into the saved package's spec."""
    spec = package.spec
    tasks = ", ".join(models)
    spec.description.metadata.author = "modernbert-ane convert.py"
    spec.description.metadata.shortDescription = (
        f"ModernBERT {tasks} ({ckpt.source}), float16, rotation {args.rotation}, norm {args.norm}, "
        + (f"MLP rotation {args.mlp_rotation}, " if args.mlp_rotation != "none" else "")
        + f"sequence lengths {', '.join(map(str, lengths))}" + (" (a function each)" if args.shapes == "functions"
                                                               and len(lengths) > 1 else ""))
    spec.description.metadata.versionString = __version__
    package.write_metadata(metadata)
    for name, (task, _) in layout.items():
        model, function = models[task], package.description(name)
        for feature in function.input:
            feature.shortDescription = (MASK_DESCRIPTION[model.max_texts > 1] if feature.name == "attention_mask"
                                        else "token ids from the model's tokenizer ([CLS] ... [SEP], then [PAD]), int32")
        for feature in function.output:
            feature.shortDescription = SPECS[task].description
    package.save()


def make_deterministic(package: Path) -> None:
    """coremltools names the manifest's items with random UUIDs; derive them from the item paths instead,
    so the same checkpoint and options give the same bytes."""
    manifest_file = package / "Manifest.json"
    manifest = json.loads(manifest_file.read_text())
    renamed = {}
    for old_id, item in manifest["itemInfoEntries"].items():
        renamed[old_id] = str(uuid.uuid5(uuid.NAMESPACE_URL, item["path"])).upper()
    manifest["itemInfoEntries"] = {renamed[k]: v for k, v in manifest["itemInfoEntries"].items()}
    manifest["rootModelIdentifier"] = renamed[manifest["rootModelIdentifier"]]
    manifest_file.write_text(json.dumps(manifest, indent=4, sort_keys=True))


def packed_input(tokenizer, texts: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One row holding the texts back to back, attention_mask = segment ids 1..K, then padding."""
    rows = [tokenizer(t, truncation=True, max_length=length // len(texts))["input_ids"] for t in texts]
    inputs = package_inputs(rows, length, tokenizer.pad_token_id)
    return torch.from_numpy(inputs["input_ids"]).long(), torch.from_numpy(inputs["attention_mask"]).long()


def check_runs(model: ModernBert, tokenizer, lengths: list[int]) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(what, input_ids, attention_mask) the check runs: a short and a long text at the smallest and the
    largest length and, for packing packages, two texts packed into the largest length."""
    runs = []
    for length in sorted({lengths[0], lengths[-1]}):
        ids, mask = tokenize(tokenizer, [EVAL_TEXTS[0], EVAL_TEXTS[6]], length, fixed_length=True)
        runs += [(f"{length} tokens", ids[i:i + 1], mask[i:i + 1]) for i in range(2)]
    if model.max_texts > 1:
        runs.append((f"2 texts packed in {lengths[-1]} tokens",
                     *packed_input(tokenizer, [EVAL_TEXTS[2], EVAL_TEXTS[6]], lengths[-1])))
    return runs


def check_package(package: Package, model: ModernBert, tokenizer, lengths: list[int], backend: str, readiness,
                  function: str | None = None):
    """Run the saved package (one function of it) and compare it with the float32 model; raise below the
    thresholds."""
    runner = PackageRunner(package, backend, function=function)
    results, observed = {}, False
    for what, ids, mask in check_runs(model, tokenizer, lengths):
        observe = None
        if ids.shape[1] == lengths[-1] and not observed and runner.backend == "emulate":
            observe, observed = readiness.observe, True             # real shapes at the largest length
        out = runner.predict({"input_ids": ids.numpy(), "attention_mask": mask.numpy()},
                             observe=observe)[OUTPUT_NAMES[model.task]]
        with torch.no_grad():
            ref = model(ids, mask).numpy()
        if not np.isfinite(out).all():
            raise UserError(f"correctness check failed ({model.task}, {what}): the package computes non-finite values "
                            f"(try --rotation auto or --norm safe, or --skip-check to keep it anyway)")
        if model.task in POOLED_TASKS:
            n = int(mask.max())                                       # one row per text in the run
            rows_ref, rows = ref[0, :n], out[0, :n]
        else:
            valid = mask.numpy() > 0
            rows_ref, rows = ref[valid], out[valid]
        results.setdefault(what, ([], []))
        results[what][0].append(rows_ref)
        results[what][1].append(rows)
    lines = []
    for what, (refs, outs) in results.items():
        rows_ref, rows = np.concatenate(refs), np.concatenate(outs)
        if model.task in COSINE_TASKS:
            score = cosine_metrics(rows_ref, rows)["cosine_min"]
            ok, summary = score >= CHECK_MIN_COSINE, f"cosine_min {score:.5f} (threshold {CHECK_MIN_COSINE})"
        else:
            score = distribution_metrics(rows_ref, rows)["top1_agreement"]
            ok, summary = score >= CHECK_MIN_TOP1, f"top-1 agreement {score:.4f} (threshold {CHECK_MIN_TOP1})"
        if not ok:
            raise UserError(f"correctness check failed ({model.task}, {what}): {summary} against the float32 model "
                            f"(--skip-check keeps the package anyway)")
        lines.append(f"{what}: {summary}")
    return runner.backend, lines


def combine_functions(parts: dict[str, Path], package: Path, default: str) -> None:
    """One multi-function package from single-function ones (function name -> package). coremltools stores a
    weight that several functions share once, so a second head, or a second length, costs only its own weights."""
    ct = import_coremltools()
    descriptor = ct.utils.MultiFunctionDescriptor()
    for name, part in parts.items():
        descriptor.add_function(str(part), "main", name)
    descriptor.default_function_name = default
    ct.utils.save_multifunction(descriptor, str(package))


def quiet_conversion() -> None:
    """Tracing and coremltools warn about things that are expected here (Python control flow fixed at
    trace time, numpy casts in constant folding). coremltools' own progress bars stay: conversion is the
    slowest step."""
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"coremltools\..*")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"coremltools\..*")


def convert_task(model: ModernBert, args, lengths: list[int], embedding_gain: float, steps, label: str,
                 tokenizer=None):
    """Rotate, trace and convert one task's model: yields an ML Program (weights compressed if asked; W8A8's
    activation scales and the learned rotation from `tokenizer`'s calibration texts) per group of
    length_groups(lengths, args.shapes), in order (one for enumerated shapes, one per length for --shapes
    functions: every function traced at its own length, from the same rotated weights)."""
    if args.compress == "w8a8":
        from modernbert_ane.activation_quant import CALIBRATION_TEXTS
        calibration = tokenize(tokenizer, CALIBRATION_TEXTS, lengths[-1])
    if rotation_step(args):                            # --rotation auto counted this step before choosing
        steps.start(f"{label}rotating ({args.rotation}" + (f", seed {args.seed}" if args.rotation in SEEDED_KINDS
                                                           else "")
                    + (f", {args.rotation_steps} steps on the W8A8 error" if args.rotation == LEARNED else "")
                    + (f"; MLP rotation {args.mlp_rotation}" if args.mlp_rotation != "none" else "") + ")")
        rotate_mlps(model, args.mlp_rotation, args.seed)       # first: the learned rotation is learned with it
        matrix = None
        if args.rotation == LEARNED:
            from modernbert_ane.rotations.learned import learn_rotation
            matrix, losses = learn_rotation(model, *calibration, steps=args.rotation_steps, seed=args.seed)
            print(f"      W8A8 relative error of the encoder output: {losses[0]:.3g} (hadamard) -> "
                  f"{min(losses):.3g} (learned, best of {len(losses)})", file=sys.stderr)
        rotate_model(model, args.rotation, args.seed, matrix=matrix)
        steps.done()
    model.set_norm(args.norm)
    if args.query_chunk:
        model.set_query_chunk(args.query_chunk)
    # one kind for every length, so that each function of a --shapes functions package is the same graph as
    # the enumerated package's at that length
    model.set_local_attention(local_attention_kind(args.local_attention, model.config, lengths))
    if args.compress == "w8a8":
        peaks = w8a8_peaks(model, calibration)
    for group in length_groups(lengths, args.shapes):
        steps.start(f"{label}tracing at {group[-1]} tokens")
        traced = trace(model, group[-1])
        steps.done()
        steps.start(f"{label}converting to an ML Program (float16" + (f", {args.compress}" if args.compress != "none"
                                                                     else "") + (f", {group[0]} tokens)"
                                                                                 if len(group) < len(lengths) else ")"))
        mlmodel = to_mlprogram(traced, model.task, group, args.deployment_target)
        del traced
        if args.compress == "w8a8":
            from modernbert_ane.activation_quant import quantize_activations
            mlmodel = quantize_activations(mlmodel, peaks)
        if args.compress != "none":
            mlmodel = compress_weights(mlmodel, model, "int8" if args.compress == "w8a8" else args.compress,
                                       embedding_gain)
        steps.done()
        yield mlmodel
        del mlmodel


def w8a8_peaks(model: ModernBert, calibration) -> dict[str, float]:
    """The calibrated peak of every conv input W8A8 quantizes; the inputs one scale per tensor would mostly round to
    zero (activation_quant.crushed_inputs) left float16, said on stderr and kept in model.float16_inputs (the
    metadata's w8a8_float16_inputs)."""
    from modernbert_ane.activation_quant import CRUSHED_RATIO, crushed_inputs, input_stats
    stats = input_stats(model, *calibration)
    crushed = crushed_inputs(stats)
    for name in crushed:
        peak, median = stats[name]
        print(f"      W8A8: {name}'s input kept float16: peak {peak:.4g} against a median of {median:.3g} "
              f"(over {CRUSHED_RATIO}x: one int8 scale would round most of it to zero)", file=sys.stderr)
    model.float16_inputs = crushed or None                 # None: not stored in the metadata
    return {name: peak for name, (peak, _) in stats.items() if name not in crushed}


def rotation_step(args) -> bool:
    """Whether a task's conversion has a rotating step: a residual or MLP rotation, or --rotation auto (counted
    before it chose, possibly none; `args.measured`)."""
    return args.rotation != "none" or args.measured or args.mlp_rotation != "none"


def main(argv) -> int:
    convert_checkpoint(build_parser().parse_args(argv))
    return 0


def convert_checkpoint(args) -> Path:
    """The conversion build_parser's `args` describe (the script's main and the Python API); the package's path."""
    quiet_conversion()
    lengths = validate(args)
    if args.output:
        check_output(Path(args.output), [args.model, args.tokenizer], args.force)
    n_tasks = len(args.task or [None])
    auto = args.rotation == "auto"
    n_groups = len(length_groups(lengths, args.shapes))
    args.measured = auto
    steps = cli.Progress(1 + auto + n_tasks * (rotation_step(args) + 2 * n_groups) + 1 + (not args.skip_check))   # auto: rotating counted
    steps.start(f"loading {args.model}", announce="done")             # the input is checked here
    ckpt = resolve_checkpoint(args.model, args.revision, args.allow_pickle)
    check_rotation("hadamard" if args.rotation == LEARNED else args.rotation, ckpt.config)   # before the weights
    check_mlp_rotation(args.mlp_rotation, ckpt.config)
    model = ModernBert.from_checkpoint(ckpt, args.task[0] if args.task else None, args.max_texts)
    tasks = args.task or [model.task]
    tokenizer = load_tokenizer(args.tokenizer or ckpt.root, tasks)
    tokenizer_source = args.tokenizer or (ckpt.source if ckpt.revision or not Path(ckpt.source).exists()
                                          else str(ckpt.root))
    if max(lengths) > model.config.max_position_embeddings:
        raise UserError(f"--seq-len {max(lengths)} exceeds the model's {model.config.max_position_embeddings} positions")
    output = Path(args.output or default_output_name(ckpt.source, tasks, args.rotation, args.seed, lengths,
                                                     args.compress, args.norm, args.shapes, args.mlp_rotation))
    check_output(output, ckpt.input_paths() + [args.tokenizer], args.force)
    transformers_model = reference_model(ckpt, model.task) if auto else None   # an input error: before any progress
    steps.done()
    embedding_gain = float(model.embeddings.norm.weight.detach().abs().max())             # before rotation folds it
    strategy, strategy_lines = None, []
    if auto:
        steps.start(f"choosing the float16 strategy ({len(strategy_candidates(args.norm))} candidates, model.py "
                    f"float16 on {len(EVAL_TEXTS)} texts against float32 transformers)")
        chosen, rows = choose_strategy(model, transformers_model, ckpt, tokenizer, args, lengths, embedding_gain)
        del transformers_model
        steps.done()
        from modernbert_ane.rotations.strategy import format_strategies, metadata_rows, measure_name
        args.rotation, args.norm = chosen["rotation"], chosen["norm"]
        strategy = {"chosen_by": "measurement", "measure": measure_name(model.task, rows),
                    "compress": args.compress, "candidates": metadata_rows(rows, model.task)}
        strategy_lines = [f"float16 strategy (--rotation auto, {steps.times[steps.what]:.1f} s; model.py float16 "
                          f"against float32 transformers on the evaluation texts"
                          + (f", {args.compress} weights simulated" if args.compress != "none" else "") + "):",
                          format_strategies(rows, model.task, chosen),
                          f"chosen: rotation {args.rotation}, norm {args.norm}"]
    args.norm = args.norm or "safe"
    models, readiness, check_lines = {}, Readiness(), []
    layout = package_layout(tasks, lengths, args.shapes)
    with staging_folder(output) as staging, writing(output):          # a full disk: one line
        parts = {}
        for task in tasks:
            if task != tasks[0]:
                model = ModernBert.from_checkpoint(ckpt, task, args.max_texts)
            names = [name for name, (of, _) in layout.items() if of == task]
            for name, mlmodel in zip(names, convert_task(model, args, lengths, embedding_gain, steps,
                                                         f"{task}: " if n_tasks > 1 else "", tokenizer)):
                readiness.add_ops(mlmodel._mil_program.functions["main"].operations)
                parts[name] = staging / f"{name or 'main'}.mlpackage"
                mlmodel.save(str(parts[name]))
                del mlmodel
            models[task] = model
        steps.start(f"saving {output}")
        package = staging / output.name
        if len(layout) == 1:
            os.replace(parts[None], package)
        else:
            combine_functions(parts, package, default_function(layout))
        saved = Package(package)                    # read once: costs, descriptions, the check
        function_costs = {name: package_costs(saved, name) for name in layout}
        costs = {task: {n: summary for name, (of, _) in layout.items() if of == task
                        for n, summary in function_costs[name].items()} for task in tasks}
        describe_package(saved, models, layout, package_metadata(models, layout, ckpt, tokenizer, tokenizer_source,
                                                                   args, lengths, function_costs, strategy),
                         ckpt, args, lengths)
        make_deterministic(package)
        steps.done()
        if not args.skip_check:
            steps.start("checking the package against the float32 model")
            for task, model in models.items():
                backend, lines = check_package(saved, model, tokenizer, lengths, args.check_backend, readiness,
                                               package_function(task, n_tasks))
                where = f"{task}, " if n_tasks > 1 else ""
                check_lines += [f"correctness check ({where}{'Core ML' if backend == 'coreml' else 'emulator'}):"]
                check_lines += [f"  {line}" for line in lines]
            steps.done()
        print(readiness.report(package, lengths[-1], costs))
        publish(package, output, args.force, OURS)
    if strategy_lines or check_lines:
        print("\n".join(strategy_lines + check_lines))
    print(f"wrote {output}  ({steps.summary()})")
    return output


def entry_point() -> None:
    """The console script (and `python convert.py`): main with one-line errors."""
    run_cli(main)


if __name__ == "__main__":
    entry_point()
