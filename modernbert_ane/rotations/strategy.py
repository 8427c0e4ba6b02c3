"""The float16 strategy (rotation x norm form) of a checkpoint, chosen by measurement.

A strategy is (rotation, norm): `rotations.rotate_model` kind and `model.NORM_KINDS` form. Each candidate
runs as model.py entirely in float16 (every op, as `diff_torch.py --precision float16` runs it; compressed
weights simulated with `compress`) on the calibration texts, against float32 transformers; the best one
wins: the lowest kl_mean for logit tasks, the highest cosine_min (worst token) for encoder / embed. A
candidate that overflows float16 anywhere (inside norms included: the ActivationProbe counts what the
emulator's pessimistic mode would) or outputs a non-finite value ranks after every one that does not: on
the calibration texts it may look fine, on the Neural Engine it is not known to be.

Imported by convert.py and bench/ only (not by `rotations/__init__`: this module reads diff_torch, which
imports rotations).
"""
import copy

import numpy as np
import torch

from modernbert_ane.diff_torch import run_model
from modernbert_ane.evaluation import output_metrics, overflow_metrics
from modernbert_ane.tasks import COSINE_TASKS
from modernbert_ane.model import ActivationProbe, ModernBert
from modernbert_ane.rotations.fuse import rotate_model

# what `convert.py --rotation auto` weighs. "fused" is left out: its squares overflow float16 once a
# token's centred activations exceed 256, which calibration texts may not show (forced with --norm fused)
AUTO_CANDIDATES = (("none", "safe"), ("identity", "safe"), ("hadamard", "safe"), ("none", "l2eps"))


def apply_strategy(model: ModernBert, rotation: str, norm: str, seed: int = 0) -> ModernBert:
    """Rotate (in place, unless "none") and put every norm in form `norm`."""
    rotate_model(model, rotation, seed)
    model.set_norm(norm)
    return model


def measure(model: ModernBert, rotation: str, norm: str, seed: int, reference: np.ndarray, input_ids,
            attention_mask, compress=None, keep_output: bool = False) -> dict:
    """One candidate on a copy of `model`: the task metrics of model.py in float16 against `reference` (the
    float32 transformers output) and its float16 overflows. `compress(model)` simulates compressed weights;
    `keep_output` adds the output itself ("output")."""
    candidate = apply_strategy(copy.deepcopy(model), rotation, norm, seed)
    if compress is not None:
        compress(candidate)
    probe = ActivationProbe()
    ours = run_model(candidate.half(), input_ids, attention_mask, torch.float16, probe)
    metrics = output_metrics(model.task, reference, ours["output"], attention_mask.numpy())
    row = {"rotation": rotation, "norm": norm, **metrics, **overflow_metrics(probe)}
    return {**row, "output": ours["output"]} if keep_output else row


def score_key(task: str):
    """Sort key of a measured candidate: safe ones first, then the task's measure (best first)."""
    def key(row: dict):
        unsafe = row["overflow_count"] > 0 or row["nonfinite"] > 0
        name = measure_name(task, [row])
        return (unsafe, -row[name] if name == "cosine_min" else row[name])
    return key


def choose(rows: list[dict], task: str) -> dict:
    """The best measured candidate (the first listed wins a tie: deterministic)."""
    return min(rows, key=score_key(task))


def measure_name(task: str, rows=()) -> str:
    """What ranks the candidates: cosine for vectors, KL for distributions, the score's error for a one-label
    head (its softmax is always 1: output_metrics reports score errors instead of KL)."""
    if task in COSINE_TASKS:
        return "cosine_min"
    return "score_abs_error_mean" if rows and "kl_mean" not in rows[0] else "kl_mean"


def rounded(value, digits: int = 3):
    """Numbers for the package metadata: 3 significant digits, so the bytes do not hang on float noise."""
    return float(f"{value:.{digits}g}") if isinstance(value, float) else value


def metadata_rows(rows: list[dict], task: str) -> list[dict]:
    keys = ["rotation", "norm", measure_name(task, rows), "overflow_count", "nonfinite"]
    keys += ["top1_agreement"] if rows and "top1_agreement" in rows[0] else []
    return [{k: rounded(row[k]) for k in keys} for row in rows]


def format_strategies(rows: list[dict], task: str, chosen: dict) -> str:
    """The comparison table printed by convert.py (Markdown)."""
    name = measure_name(task, rows)
    lines = [f"| rotation | norm | {name} | overflow_count | nonfinite | chosen |", "|---|---|---|---|---|---|"]
    for row in rows:
        mark = "yes" if row is chosen else ""
        lines.append(f"| {row['rotation']} | {row['norm']} | {row[name]:.3g} | {row['overflow_count']} | "
                     f"{row['nonfinite']} | {mark} |")
    return "\n".join(lines)
