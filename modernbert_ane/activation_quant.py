"""W8A8: int8 activations at the input of every int8-weight conv, per-tensor scales calibrated with model.py.

coremltools' `linear_quantize_activations` calibrates by running the package with Core ML (macOS only) and
recording every intermediate tensor; here model.py in float32 runs the calibration texts instead (forward
pre-hooks on the convs, padding excluded), so a W8A8 package converts on any OS. The ranges differ from
Core ML's only by float16 rounding (the package computes in float16, the calibration in float32).
The quantize -> dequantize pairs themselves are inserted by coremltools' own graph pass
(`compression::insert_prefix_quantize_dequantize_pair`, MIL `quantize`/`dequantize` of iOS 17), fed
with these ranges, on the convs only (its `add` patterns would also quantize the residual stream).

Quantization (coremltools' linear_symmetric int8, per tensor): scale = max|x| / 127, stored as float16;
q = clip(round_half_even(x / scale), -128, 127) (the scale maps the calibrated range to +-127, the quantize
op clips to the int8 range); x^ = q * scale. `fake_quant` is the same in torch, with
a straight-through gradient, for the learned rotation (rotations/learned.py).
"""
import contextlib

import numpy as np
import torch
from torch import nn

from modernbert_ane.model import ModernBert
from modernbert_ane.rotations.fuse import kept_float16

QMAX = 127                       # coremltools' linear_symmetric int8 range: [-127, 127]
# A conv input stays float16 under W8A8 (its weights stay int8) when one scale per tensor would round most of it to
# zero: its median |x| under 1/32 of an int8 step, i.e. peak / median > 127 * 32. Measured on the calibration texts
# (float32): the trained reference's conv inputs reach peak / median 627 at most (GeGLU products, plain or planted);
# the planted massive inputs 4.2e4 (embedding plant: layer 0's Wqkv, unrotated) and 6.9e5 (MLP plant: layer 1's
# mlp.Wo, which no residual rotation reaches). The rule's 4064 lies in that gap.
CRUSHED_RATIO = QMAX * 32

# Calibration texts: not the evaluation texts (evaluation.EVAL_TEXTS), so a fidelity report does not measure the
# texts the scales were fitted on. Prose and Python, like the models this project runs.
CALIBRATION_TEXTS = [
    "The committee met on Tuesday to review the budget and postpone the vote until next month.",
    "A river flows through the old town, crossed by seven stone bridges built over three centuries.",
    "Photosynthesis converts light energy into chemical energy stored in glucose molecules.",
    "def read_lines(path):\n    with open(path, encoding='utf-8') as f:\n        return [line.rstrip() for line in f]",
    "    # Skip blank lines and comments before parsing the header.\n    if not line or line.startswith('#'):\n"
    "        continue",
    "class Queue:\n    \"\"\"A first-in, first-out queue backed by a deque.\"\"\"\n\n    def __init__(self):\n"
    "        self._items = collections.deque()\n\n    def push(self, item):\n        self._items.append(item)",
    "for key, value in sorted(options.items()):\n    print(f'{key} = {value!r}', file=sys.stderr)",
    "Return the number of seconds since the epoch as a floating point number; raise ValueError when the "
    "timestamp is out of range for the platform's time_t.",
]


def quantized_convs(model: ModernBert) -> dict[str, nn.Conv2d]:
    """The convs whose inputs W8A8 quantizes: every conv with int8 weights, so not the rotation's two nor the online
    MLP rotations (kept float16: fuse.kept_float16), whose inputs stay float16 too."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and not kept_float16(name)}


@torch.no_grad()
def input_stats(model: ModernBert, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, tuple]:
    """(max |x|, median |x|) over the non-padding tokens of each quantized conv's input, model.py in float32."""
    stats, valid = {}, attention_mask[:, None, None, :] > 0                          # (B, 1, 1, S)

    def hook(name):
        def record(module, inputs):
            x = inputs[0].float().abs()                                                # (B, C, 1, S)
            values = x.masked_select(valid.expand_as(x))
            stats[name] = (float(values.max()), float(values.median()))
        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in quantized_convs(model).items()]
    try:
        model(input_ids, attention_mask)
    finally:
        for h in handles:
            h.remove()
    return stats


def calibrate(model: ModernBert, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, float]:
    """max |x| over the non-padding tokens of each quantized conv's input, model.py in float32."""
    return {name: peak for name, (peak, _) in input_stats(model, input_ids, attention_mask).items()}


def crushed_inputs(stats: dict[str, tuple]) -> list[str]:
    """The quantized convs whose input one int8 scale per tensor would mostly round to zero (CRUSHED_RATIO): W8A8
    leaves those inputs float16, in calibration order."""
    return [name for name, (peak, median) in stats.items() if peak > CRUSHED_RATIO * median]


def activation_scale(peak: float) -> float:
    """coremltools' linear_symmetric int8 scale of a tensor whose largest |value| is `peak`, as the package
    stores it (float16); 1 for an all-zero tensor, as coremltools does."""
    return float(np.float16(peak / QMAX)) if peak > 0 else 1.0


def fake_quant(x: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """quantize -> dequantize (torch.round: half to even, as coremltools' np.around); gradient straight through."""
    q = torch.clamp(torch.round(x / scale), -QMAX - 1, QMAX) * scale       # the quantize op clips to int8's range
    return x + (q - x).detach()


@contextlib.contextmanager
def simulated_activations(model: ModernBert, scales: dict[str, float]):
    """model.py with every quantized conv's input fake-quantized at `scales` (per tensor) while inside."""
    handles = [m.register_forward_pre_hook(lambda _m, inputs, s=scales[name]: (fake_quant(inputs[0], s),))
               for name, m in quantized_convs(model).items()]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


def conv_op_names(mlmodel, names) -> dict[str, str]:
    """MIL conv op name -> model.py conv name, for the convs `names` (matched by the traced weight's name:
    `model_layers_0_attn_Wqkv_weight...`)."""
    slugs = {f"model_{name.replace('.', '_')}_weight": name for name in names}
    found = {}
    for op in mlmodel._mil_program.functions["main"].operations:
        if op.op_type == "conv":
            weight = op.inputs["weight"].name
            matches = [name for slug, name in slugs.items() if weight == slug or weight.startswith(slug + "_")]
            if matches:
                found[op.name] = matches[0]
    missing = set(slugs.values()) - set(found.values())
    if missing:
        raise ValueError(f"no conv op found in the program for {', '.join(sorted(missing))}")
    return found


def quantize_activations(mlmodel, peaks: dict[str, float]):
    """The ML Program with a quantize -> dequantize pair (int8, per tensor, the scale from `peaks`) before
    the input of every conv named in `peaks`; coremltools' pass does the insertion."""
    import coremltools.optimize.coreml as cto
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY
    from coremltools.converters.mil.mil.passes.graph_pass import PassOption
    from coremltools.converters.mil._deployment_compatibility import AvailableTarget
    from coremltools.converters.mil.frontend.milproto import load as milproto_load
    from coremltools.models.utils import _apply_graph_pass
    ops = conv_op_names(mlmodel, peaks)
    inputs = {op.name: op.inputs["x"].name for op in mlmodel._mil_program.functions["main"].operations
              if op.name in ops}
    stats = {inputs[op]: {"rmin": -peaks[name], "rmax": peaks[name]} for op, name in ops.items()}
    config = cto.OptimizationConfig(op_name_configs={
        op: cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8") for op in ops})
    insert = PASS_REGISTRY["compression::insert_prefix_quantize_dequantize_pair"]
    insert.set_options([PassOption("config", config)])
    insert.set_options([PassOption("activation_stats", stats)])
    return _apply_graph_pass(mlmodel, [insert], spec_version=AvailableTarget.iOS17,
                             pymil_load_func=milproto_load.load, skip_model_load=True)
