"""float16 rounding, parameter readers and float16 sums shared by the ops."""
from typing import List

import numpy as np

F32 = np.float32
F16 = np.float16


U32 = np.uint32
SUBNORMAL_F16 = np.float32(2.0 ** -14)  # smallest normal float16
MAX_F16 = np.float32(65504.0)


def f16(x) -> np.ndarray:
    """Round to the nearest float16 (ties to even), returned as a float32 array.

    Bit-exact with ``x.astype(float16).astype(float32)`` (overflow -> inf, float16
    subnormals kept) but ~4x faster: the float32 mantissa is rounded to 10 bits in place."""
    x = np.asarray(x, dtype=F32)
    if x.size < 64:
        with np.errstate(over="ignore", invalid="ignore"):
            return x.astype(F16).astype(F32)
    if not x.flags.c_contiguous:
        x = np.ascontiguousarray(x)
    b = x.view(U32)
    r = (b >> U32(13)) & U32(1)
    r += b
    r += U32(0x0FFF)
    r &= U32(0xFFFFE000)
    r = r.view(F32)
    ax = np.abs(x)
    small = ax < SUBNORMAL_F16
    if small.any():  # float16 subnormal range: fixed quantum 2**-24
        r[small] = np.rint(x[small] * np.float32(2.0 ** 24)) * np.float32(2.0 ** -24)
    big = np.abs(r) > MAX_F16
    if big.any():  # overflow -> inf; NaN stays NaN
        xb = x[big]
        r[big] = np.where(np.isnan(xb), xb, np.copysign(np.float32(np.inf), xb))
    return r


def f32(x) -> np.ndarray:
    x = np.asarray(x)
    return x if x.dtype == F32 else x.astype(F32)


def as_int(v) -> int:
    return int(np.asarray(v).reshape(-1)[0]) if np.ndim(v) else int(v)


def as_ints(v) -> List[int]:
    return [int(i) for i in np.asarray(v).reshape(-1)]


def as_bool(v, default=False) -> bool:
    return default if v is None else bool(np.asarray(v).reshape(-1)[0]) if np.ndim(v) else bool(v)


def as_str(v, default=None):
    if v is None:
        return default
    if isinstance(v, np.ndarray):
        v = v.item()
    return str(v)


def norm_axes(axes, rank) -> List[int]:
    return sorted({(int(a) + rank) if int(a) < 0 else int(a) for a in np.asarray(axes).reshape(-1)})


def norm_axis(axis, rank) -> int:
    axis = as_int(axis)
    return axis + rank if axis < 0 else axis


def reduce_axes(x, axes):
    if axes is None:
        return list(range(np.ndim(x)))
    return norm_axes(axes, np.ndim(x))


def sum16(x, axes, keepdims) -> np.ndarray:
    """Sum over `axes` accumulating in float16 (pairwise/tree order, every partial sum
    rounded). Pessimistic-mode reduction."""
    x = f32(x)
    rank = x.ndim
    axes = sorted(set(axes))
    other = [i for i in range(rank) if i not in axes]
    out_shape = [x.shape[i] for i in other]
    keep_shape = [1 if i in axes else d for i, d in enumerate(x.shape)]
    y = np.transpose(x, other + axes).reshape(out_shape + [-1]) if axes else x.reshape(out_shape + [1])
    n = y.shape[-1]
    if n == 0:
        y = np.zeros(out_shape + [1], F32)
    while n > 1:
        h = n // 2
        s = f16(y[..., :h] + y[..., h : 2 * h])
        if n % 2:
            s = np.concatenate([s, y[..., 2 * h :]], axis=-1)
        y = s
        n = y.shape[-1]
    y = y[..., 0]
    return y.reshape(keep_shape) if keepdims else y.reshape(out_shape)


def count_elements(x, axes) -> int:
    return int(np.prod([np.shape(x)[a] for a in axes])) if axes else 1


def poison(y, bad):
    """NaN where `bad` (broadcast) is true: an overflowed internal step."""
    if np.any(bad):
        y = np.where(bad, np.float32(np.nan), y)
    return y
