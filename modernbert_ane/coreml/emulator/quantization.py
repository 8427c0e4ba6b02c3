"""Activation quantization (iOS 17 `quantize` / `dequantize`), exact in both modes."""
import numpy as np

from .constexpr import promote_to_rank
from .elementwise import INT_DTYPES
from .errors import EmulationError
from .numerics import as_int, as_str, f32
from .registry import register


def quant_params(a, x):
    """scale and zero point (0 when absent) broadcast against x: scalars, or vectors along `axis`."""
    axis = a.get("axis")
    axis = None if axis is None else as_int(axis)
    scale = np.asarray(a["scale"], dtype=np.float32)
    zp = a.get("zero_point")
    zp = np.zeros((), np.float32) if zp is None else np.asarray(zp).astype(np.float32)
    if scale.ndim and axis is None:
        raise EmulationError("quantize/dequantize: a vector scale needs an axis")
    if scale.ndim:
        scale, zp = promote_to_rank(scale, x, axis), promote_to_rank(zp, x, axis)
    return scale, zp


@register("quantize")
def _quantize(a, ctx):
    """q = clip(round(x / scale) + zero_point) to the output dtype's full range; rounding half to even
    (coremltools' reference, np.around). Exact in both modes: one division and one rounding."""
    x = f32(a["input"])
    dtype = INT_DTYPES[as_str(a["output_dtype"])]
    scale, zp = quant_params(a, x)
    if x.size and not np.all(np.isfinite(x)):
        raise EmulationError(f"{ctx.where()}: cannot quantize non-finite values")
    info = np.iinfo(dtype)
    return np.clip(np.rint(x / scale) + zp, info.min, info.max).astype(dtype)


@register("dequantize")
def _dequantize(a, ctx):
    """x = scale * (q - zero_point), rounded to float16 like every float output."""
    q = np.asarray(a["input"])
    scale, zp = quant_params(a, q)
    return (q.astype(np.float32) - zp) * scale
