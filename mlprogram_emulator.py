"""Run a Core ML ML Program (``.mlpackage``) with NumPy, storing every tensor as float16.

Core ML prediction only exists on macOS. This module loads a saved ``.mlpackage`` on any
platform and executes one function of its MIL program (default ``"main"``) op by op in
topological order. It knows nothing about any particular model: it is a generic ML Program
interpreter.

Loading reads the package's ``Model.proto`` (``Data/com.apple.CoreML/model.mlmodel``) directly
and the weights through coremltools' native blob reader. (coremltools' own
``milproto.load.load`` also works, but rebuilds a pymil program with type inference for every
op: ~15 s for a 15k-op encoder, versus ~1.5 s here.) Weight-compression ops
(``constexpr_*``: affine_dequantize, cast, lut_to_dense, sparse_to_dense, blockwise_shift_scale,
sparse_blockwise_shift_scale, lut_to_sparse; iOS16 and iOS18 flavours) are decompressed once
at load time. Shapes are never materialized: flexible inputs (``EnumeratedShapes``, ranges)
simply run with the actual arrays (``shape``, ``range_1d``, ``fill``, dynamic ``reshape``...
compute on real values). Intermediate values are freed after their last use.

Numerics (the default, ``pessimistic=False``)
    Every op computes in float32 internally and its output is then rounded to float16, the
    way the Apple Neural Engine stores tensors. Values beyond +-65504 become +-inf. This applies
    to *all* float outputs, including ones the program declares as fp32, and to float
    constants (weights, epsilons, ...), which are rounded to float16 when the package is
    loaded. Integer and bool outputs keep their declared dtype; narrowing an integer to a
    dtype that cannot hold it (e.g. ``cast`` of token id 40000 to int16) raises
    :class:`EmulationError` instead of wrapping silently, and so do out-of-range
    gather/scatter indices. Negative indices count from the end, like NumPy.
    Function inputs are cast to the dtypes the program declares (an fp16 input is rounded,
    an fp32 input is kept as given until the first op consumes it).
    ``scaled_dot_product_attention`` is treated as its decomposition
    (matmul -> scale + mask -> softmax -> matmul): the scores and the attention
    probabilities are rounded to float16 too, as they are materialized on the hardware.

Pessimistic mode (``pessimistic=True``)
    Ops that are numerically fragile in float16 also round their *internal* steps to
    float16: layer_norm, batch_norm, instance_norm, l2_norm, softmax (also inside
    scaled_dot_product_attention), reduce_sum / reduce_mean / reduce_l1_norm /
    reduce_l2_norm / reduce_sum_square / reduce_log_sum / reduce_log_sum_exp, and float
    cumsum. Sums are accumulated in float16 by pairwise (tree) reduction with every partial
    sum rounded; e.g. layer_norm rounds the mean, the centered values, their squares
    (which overflow to inf beyond ~256), the variance, ``var + eps`` and the rsqrt, then each
    product. Softmax rounds ``x - max``, ``exp``, the sum and the quotient. Where an
    intermediate overflowed, the result is poisoned to NaN instead of being silently absorbed
    (``rsqrt(inf) = 0`` would otherwise turn an overflow into plausible-looking zeros).
    Matrix products (conv, linear, matmul, einsum) still accumulate in float32.
    This mode *over-approximates* what float16 hardware can do: real hardware may use wider
    accumulators or fused kernels, so a model whose activations stay finite and accurate
    under pessimistic mode is safe to run in float16; a model that fails only in pessimistic
    mode *may* still be fine on the device.

Outputs
    :meth:`MLProgramEmulator.predict` returns float outputs as **float32 arrays holding
    float16-representable values**, integer outputs with their declared integer dtype and
    bool outputs as bool.

Not supported (raise :class:`UnsupportedOpError`): control flow (``cond``/``while_loop``),
states (``read_state``/``write_state``), list ops, pooling, image resizing, recurrent
layers, random ops, ``conv_transpose`` and other ops not listed in ``supported_op_types()``.

Import note: coremltools is imported lazily through ``quiet_coremltools``.
"""
from __future__ import annotations

import itertools
import json
import math
import os
from collections import Counter
from typing import Callable, Dict, List, Optional

import numpy as np
from scipy.special import erf as _erf

__all__ = [
    "MLProgramEmulator",
    "UnsupportedOpError",
    "NotAnMLPackageError",
    "EmulationError",
    "supported_op_types",
]


class UnsupportedOpError(NotImplementedError):
    """The program contains an op type the emulator does not implement."""


class NotAnMLPackageError(ValueError):
    """The path is missing or is not an ML Program ``.mlpackage``."""


class EmulationError(ValueError):
    """A value the hardware could not represent faithfully (integer overflow in a narrowing
    cast, out-of-range gather/scatter index)."""


# --------------------------------------------------------------------------------------
# Small numeric helpers
# --------------------------------------------------------------------------------------

_F32 = np.float32
_F16 = np.float16


_U32 = np.uint32
_SUBNORMAL_F16 = np.float32(2.0 ** -14)  # smallest normal float16
_MAX_F16 = np.float32(65504.0)


def _f16(x) -> np.ndarray:
    """Round to the nearest float16 (ties to even), returned as a float32 array.

    Bit-exact with ``x.astype(float16).astype(float32)`` (overflow -> inf, float16
    subnormals kept) but ~4x faster: the float32 mantissa is rounded to 10 bits in place."""
    x = np.asarray(x, dtype=_F32)
    if x.size < 64:
        with np.errstate(over="ignore", invalid="ignore"):
            return x.astype(_F16).astype(_F32)
    if not x.flags.c_contiguous:
        x = np.ascontiguousarray(x)
    b = x.view(_U32)
    r = (b >> _U32(13)) & _U32(1)
    r += b
    r += _U32(0x0FFF)
    r &= _U32(0xFFFFE000)
    r = r.view(_F32)
    ax = np.abs(x)
    small = ax < _SUBNORMAL_F16
    if small.any():  # float16 subnormal range: fixed quantum 2**-24
        r[small] = np.rint(x[small] * np.float32(2.0 ** 24)) * np.float32(2.0 ** -24)
    big = np.abs(r) > _MAX_F16
    if big.any():  # overflow -> inf; NaN stays NaN
        xb = x[big]
        r[big] = np.where(np.isnan(xb), xb, np.copysign(np.float32(np.inf), xb))
    return r


def _f32(x) -> np.ndarray:
    x = np.asarray(x)
    return x if x.dtype == _F32 else x.astype(_F32)


def _int(v) -> int:
    return int(np.asarray(v).reshape(-1)[0]) if np.ndim(v) else int(v)


def _ints(v) -> List[int]:
    return [int(i) for i in np.asarray(v).reshape(-1)]


def _bool(v, default=False) -> bool:
    return default if v is None else bool(np.asarray(v).reshape(-1)[0]) if np.ndim(v) else bool(v)


def _str(v, default=None):
    if v is None:
        return default
    if isinstance(v, np.ndarray):
        v = v.item()
    return str(v)


def _norm_axes(axes, rank) -> List[int]:
    return sorted({(int(a) + rank) if int(a) < 0 else int(a) for a in np.asarray(axes).reshape(-1)})


def _norm_axis(axis, rank) -> int:
    axis = _int(axis)
    return axis + rank if axis < 0 else axis


def _reduce_axes(x, axes):
    if axes is None:
        return list(range(np.ndim(x)))
    return _norm_axes(axes, np.ndim(x))


def _sum16(x, axes, keepdims) -> np.ndarray:
    """Sum over `axes` accumulating in float16 (pairwise/tree order, every partial sum
    rounded). Pessimistic-mode reduction."""
    x = _f32(x)
    rank = x.ndim
    axes = sorted(set(axes))
    other = [i for i in range(rank) if i not in axes]
    out_shape = [x.shape[i] for i in other]
    keep_shape = [1 if i in axes else d for i, d in enumerate(x.shape)]
    y = np.transpose(x, other + axes).reshape(out_shape + [-1]) if axes else x.reshape(out_shape + [1])
    n = y.shape[-1]
    if n == 0:
        y = np.zeros(out_shape + [1], _F32)
    while n > 1:
        h = n // 2
        s = _f16(y[..., :h] + y[..., h : 2 * h])
        if n % 2:
            s = np.concatenate([s, y[..., 2 * h :]], axis=-1)
        y = s
        n = y.shape[-1]
    y = y[..., 0]
    return y.reshape(keep_shape) if keepdims else y.reshape(out_shape)


def _count(x, axes) -> int:
    return int(np.prod([np.shape(x)[a] for a in axes])) if axes else 1


def _poison(y, bad):
    """NaN where `bad` (broadcast) is true: an overflowed internal step."""
    if np.any(bad):
        y = np.where(bad, np.float32(np.nan), y)
    return y


# --------------------------------------------------------------------------------------
# Op context and dispatch table
# --------------------------------------------------------------------------------------


class _Ctx:
    __slots__ = ("pessimistic", "op_name", "op_type", "n_out", "out_kinds")

    def __init__(self, pessimistic, op_name, op_type, n_out, out_kinds):
        self.pessimistic = pessimistic
        self.op_name = op_name
        self.op_type = op_type
        self.n_out = n_out
        self.out_kinds = out_kinds

    def where(self) -> str:
        return f"{self.op_type} op '{self.op_name}'"


_OPS: Dict[str, Callable] = {}


def _op(*names):
    def deco(fn):
        for n in names:
            _OPS[n] = fn
        return fn

    return deco


def supported_op_types() -> List[str]:
    """Sorted op types the emulator can execute (plus ``const``)."""
    return sorted(set(_OPS) | {"const"})


# ---- elementwise binary -------------------------------------------------------------

def _binary(fn):
    def run(a, ctx):
        x, y = np.asarray(a["x"]), np.asarray(a["y"])
        if x.dtype.kind in "iu" and y.dtype.kind in "iu":
            # exact integer arithmetic; narrowing to the declared dtype is range-checked
            x, y = x.astype(np.int64, copy=False), y.astype(np.int64, copy=False)
        return fn(x, y)

    return run


def _is_float(*xs):
    return any(np.asarray(x).dtype.kind == "f" for x in xs)


def _real_div(x, y):
    if not _is_float(x, y):  # integer real_div: truncating division like C
        return np.trunc(x.astype(np.float64) / y).astype(np.result_type(x, y))
    return np.divide(_f32(x), _f32(y))


def _pow(x, y):
    if _is_float(x, y):
        return np.power(_f32(x), _f32(y))
    return np.power(x, y)


for _name, _fn in {
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "real_div": _real_div,
    "floor_div": np.floor_divide,
    "pow": _pow,
    "maximum": np.maximum,
    "minimum": np.minimum,
    "mod": np.mod,
    "equal": np.equal,
    "not_equal": np.not_equal,
    "greater": np.greater,
    "greater_equal": np.greater_equal,
    "less": np.less,
    "less_equal": np.less_equal,
    "logical_and": np.logical_and,
    "logical_or": np.logical_or,
    "logical_xor": np.logical_xor,
}.items():
    _OPS[_name] = _binary(_fn)


# ---- elementwise unary ----------------------------------------------------------------

def _unary(fn):
    def run(a, ctx):
        return fn(np.asarray(a["x"]))

    return run


def _fl(fn):
    return lambda x: fn(_f32(x))


for _name, _fn in {
    "abs": np.abs,
    "sign": np.sign,
    "acos": _fl(np.arccos),
    "asin": _fl(np.arcsin),
    "atan": _fl(np.arctan),
    "atanh": _fl(np.arctanh),
    "ceil": np.ceil,
    "floor": np.floor,
    "round": np.round,  # half to even: 0.5 -> 0, like MIL
    "cos": _fl(np.cos),
    "cosh": _fl(np.cosh),
    "sin": _fl(np.sin),
    "sinh": _fl(np.sinh),
    "tan": _fl(np.tan),
    "tanh": _fl(np.tanh),
    "exp": _fl(np.exp),
    "exp2": _fl(np.exp2),
    "erf": _fl(_erf),
    "sqrt": _fl(np.sqrt),
    "square": lambda x: np.square(x),
    "logical_not": np.logical_not,
    "identity": lambda x: x,
    "relu": lambda x: np.maximum(x, np.zeros((), x.dtype)),
    "relu6": lambda x: np.minimum(np.maximum(x, np.zeros((), x.dtype)), np.asarray(6, x.dtype)),
    "sigmoid": _fl(lambda x: 1.0 / (1.0 + np.exp(-x))),
    "silu": _fl(lambda x: x / (1.0 + np.exp(-x))),
    "softplus": _fl(lambda x: np.logaddexp(np.float32(0), x)),
    "softsign": _fl(lambda x: x / (1.0 + np.abs(x))),
}.items():
    _OPS[_name] = _unary(_fn)


@_op("inverse")
def _inverse(a, ctx):
    eps = a.get("epsilon")
    eps = np.float32(1e-4) if eps is None else eps
    return 1.0 / (_f32(a["x"]) + eps)


@_op("log")
def _log(a, ctx):
    eps = a.get("epsilon")
    eps = np.float32(0) if eps is None else eps
    return np.log(_f32(a["x"]) + eps)


@_op("rsqrt")
def _rsqrt(a, ctx):
    eps = a.get("epsilon")
    eps = np.float32(0) if eps is None else eps
    return 1.0 / np.sqrt(_f32(a["x"]) + eps)


@_op("clip")
def _clip(a, ctx):
    return np.minimum(np.maximum(a["x"], a["alpha"]), a["beta"])


@_op("threshold")
def _threshold(a, ctx):
    return np.maximum(a["x"], a["alpha"])


@_op("thresholded_relu")
def _thresholded_relu(a, ctx):
    x = _f32(a["x"])
    return np.where(x >= a["alpha"], x, np.float32(0))


@_op("leaky_relu")
def _leaky_relu(a, ctx):
    x = _f32(a["x"])
    return np.where(x < 0, x * a["alpha"], x)


@_op("elu")
def _elu(a, ctx):
    x = _f32(a["x"])
    return np.where(x > 0, x, a["alpha"] * np.expm1(np.minimum(x, 0)))


@_op("clamped_relu")
def _clamped_relu(a, ctx):
    x = _f32(a["x"])
    return np.minimum(np.maximum(x, 0), a["beta"]) + np.minimum(np.minimum(x, 0) * a["alpha"], a["beta"])


@_op("linear_activation")
def _linear_activation(a, ctx):
    return _f32(a["x"]) * a["alpha"] + a["beta"]


@_op("scaled_tanh")
def _scaled_tanh(a, ctx):
    return a["alpha"] * np.tanh(_f32(a["x"]) * a["beta"])


@_op("sigmoid_hard")
def _sigmoid_hard(a, ctx):
    return np.minimum(np.maximum(_f32(a["x"]) * a["alpha"] + a["beta"], 0), 1)


def _channel_param(p, x):
    p = np.asarray(p, _F32).reshape(-1)
    return p.reshape([1, -1] + [1] * (np.ndim(x) - 2)) if p.size > 1 else p.reshape(())


@_op("prelu")
def _prelu(a, ctx):
    x = _f32(a["x"])
    return np.where(x > 0, x, x * _channel_param(a["alpha"], x))


@_op("softplus_parametric")
def _softplus_parametric(a, ctx):
    x = _f32(a["x"])
    return _channel_param(a["alpha"], x) * np.logaddexp(np.float32(0), x * _channel_param(a["beta"], x))


_SQRT_2_OVER_PI = np.float32(math.sqrt(2.0 / math.pi))
_INV_SQRT2 = np.float32(1.0 / math.sqrt(2.0))


@_op("gelu")
def _gelu(a, ctx):
    x = _f32(a["x"])
    mode = _str(a.get("mode"), "EXACT")
    if mode == "EXACT":
        return np.float32(0.5) * x * (np.float32(1) + _erf(x * _INV_SQRT2))
    if mode == "TANH_APPROXIMATION":
        inner = _SQRT_2_OVER_PI * (x + np.float32(0.044715) * x * x * x)
        return np.float32(0.5) * x * (np.float32(1) + np.tanh(inner))
    if mode == "SIGMOID_APPROXIMATION":
        return x / (np.float32(1) + np.exp(np.float32(-1.702) * x))
    raise UnsupportedOpError(f"{ctx.where()}: gelu mode {mode!r} is not supported")


@_op("select")
def _select(a, ctx):
    return np.where(np.asarray(a["cond"]).astype(bool), a["a"], a["b"])


_INT_DTYPES = {
    "int8": np.int8, "uint8": np.uint8, "int16": np.int16, "uint16": np.uint16,
    "int32": np.int32, "uint32": np.uint32, "int64": np.int64,
}


def _to_int(x, dtype, ctx):
    """Cast to an integer dtype, refusing values it cannot hold (no silent wrap)."""
    x = np.asarray(x)
    info = np.iinfo(dtype)
    if x.dtype.kind == "f":
        if x.size and not np.all(np.isfinite(x)):
            raise EmulationError(f"{ctx.where()}: cannot convert non-finite values to {np.dtype(dtype).name}")
        x = np.trunc(x)
    elif x.dtype.kind == "b":
        return x.astype(dtype)
    if x.size and np.dtype(x.dtype) != np.dtype(dtype):
        lo, hi = x.min(), x.max()
        if lo < info.min or hi > info.max:
            bad = hi if hi > info.max else lo
            raise EmulationError(
                f"{ctx.where()}: value {int(bad)} does not fit in {np.dtype(dtype).name} "
                f"[{info.min}, {info.max}] (the device would wrap it silently)"
            )
    return x.astype(dtype)


@_op("cast")
def _cast(a, ctx):
    dtype = _str(a["dtype"])
    x = np.asarray(a["x"])
    if dtype in ("fp16", "fp32", "fp64"):
        return _f32(x)
    if dtype == "bool":
        return x != 0
    if dtype in _INT_DTYPES:
        return _to_int(x, _INT_DTYPES[dtype], ctx)
    raise UnsupportedOpError(f"{ctx.where()}: cast to {dtype!r} is not supported")


# ---- linear algebra -----------------------------------------------------------------

@_op("matmul")
def _matmul(a, ctx):
    x, y = np.asarray(a["x"]), np.asarray(a["y"])
    if _is_float(x, y):
        x, y = _f32(x), _f32(y)
    if _bool(a.get("transpose_x")) and x.ndim >= 2:
        x = np.swapaxes(x, -1, -2)
    if _bool(a.get("transpose_y")) and y.ndim >= 2:
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


@_op("linear")
def _linear(a, ctx):
    x = _f32(a["x"])
    w = _f32(a["weight"])
    y = np.matmul(x, w.T)
    b = a.get("bias")
    if b is not None:
        y = y + b
    return y


def _einsum_as_matmul(eq, x, y):
    """Two-operand einsum without repeated/ellipsis subscripts as one batched matmul
    (BLAS), or None when the equation does not have that form."""
    if "..." in eq or "->" not in eq:
        return None
    ins, out = eq.split("->")
    parts = ins.split(",")
    if len(parts) != 2:
        return None
    a, b = parts
    if len(a) != x.ndim or len(b) != y.ndim or any(len(set(t)) != len(t) for t in (a, b, out)):
        return None
    batch = [c for c in out if c in a and c in b]
    contract = [c for c in a if c in b and c not in out]
    free_a = [c for c in a if c not in b]
    free_b = [c for c in b if c not in a]
    if any(c not in out for c in free_a + free_b) or len(batch) + len(free_a) + len(free_b) != len(out):
        return None
    sa, sb = dict(zip(a, x.shape)), dict(zip(b, y.shape))
    if any(sa[c] != sb[c] for c in batch + contract):
        return None
    size = lambda cs, sz: int(np.prod([sz[c] for c in cs])) if cs else 1
    xa = np.transpose(x, [a.index(c) for c in batch + free_a + contract]).reshape(
        size(batch, sa), size(free_a, sa), size(contract, sa))
    yb = np.transpose(y, [b.index(c) for c in batch + contract + free_b]).reshape(
        size(batch, sb), size(contract, sb), size(free_b, sb))
    r = np.matmul(xa, yb).reshape([sa[c] for c in batch] + [sa[c] for c in free_a] + [sb[c] for c in free_b])
    cur = batch + free_a + free_b
    return np.transpose(r, [cur.index(c) for c in out])


@_op("einsum")
def _einsum(a, ctx):
    vals = [_f32(v) for v in a["values"]]
    eq = _str(a["equation"]).replace(" ", "")
    if len(vals) == 2:
        r = _einsum_as_matmul(eq, vals[0], vals[1])
        if r is not None:
            return r
    return np.einsum(eq, *vals, optimize=True)


def _conv_pads(pad_type, pad, in_sp, ks, strides, dils):
    n = len(in_sp)
    if pad_type == "valid":
        return [(0, 0)] * n
    if pad_type == "custom":
        p = _ints(pad) if pad is not None else [0] * (2 * n)
        return [(p[2 * i], p[2 * i + 1]) for i in range(n)]
    if pad_type in ("same", "same_lower"):
        pads = []
        for i in range(n):
            out = -(-in_sp[i] // strides[i])
            eff_k = (ks[i] - 1) * dils[i] + 1
            total = max((out - 1) * strides[i] + eff_k - in_sp[i], 0)
            small, big = total // 2, total - total // 2
            pads.append((small, big) if pad_type == "same" else (big, small))
        return pads
    raise ValueError(f"unknown pad_type {pad_type!r}")


@_op("conv")
def _conv(a, ctx):
    x = _f32(a["x"])
    w = _f32(a["weight"])
    nsp = x.ndim - 2
    if nsp < 1 or w.ndim != x.ndim:
        raise UnsupportedOpError(f"{ctx.where()}: conv with input rank {x.ndim} / weight rank {w.ndim}")
    strides = _ints(a["strides"]) if a.get("strides") is not None else [1] * nsp
    dils = _ints(a["dilations"]) if a.get("dilations") is not None else [1] * nsp
    groups = _int(a["groups"]) if a.get("groups") is not None else 1
    pad_type = _str(a.get("pad_type"), "valid")
    ks = list(w.shape[2:])
    n, cin = x.shape[:2]
    in_sp = list(x.shape[2:])
    cout = w.shape[0]
    pads = _conv_pads(pad_type, a.get("pad"), in_sp, ks, strides, dils)
    if groups == 1 and all(k == 1 for k in ks) and all(s == 1 for s in strides) and not any(
        p for pp in pads for p in pp
    ):
        # 1x1 convolution == one matrix product over channels
        y = np.matmul(w.reshape(cout, cin), x.reshape(n, cin, -1)).reshape([n, cout] + in_sp)
    else:
        if any(p for pp in pads for p in pp):
            x = np.pad(x, [(0, 0), (0, 0)] + pads)
        sp = list(x.shape[2:])
        out_sp = [(sp[i] - ((ks[i] - 1) * dils[i] + 1)) // strides[i] + 1 for i in range(nsp)]
        cin_g, cout_g = cin // groups, cout // groups
        wg = w.reshape([groups, cout_g, cin_g] + ks)
        y = np.zeros((n, groups, cout_g, int(np.prod(out_sp))), _F32)
        for pos in itertools.product(*[range(k) for k in ks]):
            sl = tuple(
                slice(p * d, p * d + (o - 1) * s + 1, s) for p, d, o, s in zip(pos, dils, out_sp, strides)
            )
            xs = x[(slice(None), slice(None)) + sl].reshape(n, groups, cin_g, -1)
            y += np.matmul(wg[(Ellipsis,) + tuple(pos)][None], xs)
        y = y.reshape([n, cout] + out_sp)
    b = a.get("bias")
    if b is not None:
        y = y + np.asarray(b, _F32).reshape([1, -1] + [1] * nsp)
    return y


# ---- normalization / softmax / reductions ---------------------------------------------

def _softmax_core(x, axis, pessimistic):
    x = _f32(x)
    m = np.max(x, axis=axis, keepdims=True)
    if not pessimistic:
        e = np.exp(x - m)
        return e / np.sum(e, axis=axis, keepdims=True)
    e = _f16(np.exp(_f16(x - m)))
    s = _sum16(e, [axis % x.ndim], True)
    return e / s


@_op("softmax")
def _softmax(a, ctx):
    x = a["x"]
    axis = _norm_axis(a.get("axis") if a.get("axis") is not None else -1, np.ndim(x))
    return _softmax_core(x, axis, ctx.pessimistic)


def _gamma_beta(p, x, axes):
    if p is None:
        return None
    shape = [x.shape[i] if i in axes else 1 for i in range(x.ndim)]
    return np.asarray(p, _F32).reshape(shape)


def _normalize(x, axes, eps, gamma, beta, pessimistic):
    """(x - mean) / sqrt(var + eps) * gamma + beta over `axes` (layer/instance norm)."""
    n = _count(x, axes)
    ax = tuple(axes)
    eps = np.float32(eps)
    if not pessimistic:
        mean = np.mean(x, axis=ax, keepdims=True, dtype=_F32)
        zm = x - mean
        var = np.mean(zm * zm, axis=ax, keepdims=True, dtype=_F32)
        y = zm * (np.float32(1) / np.sqrt(var + eps))
        if gamma is not None:
            y = y * gamma
        if beta is not None:
            y = y + beta
        return y
    mean = _f16(_sum16(x, axes, True) / np.float32(n))
    zm = _f16(x - mean)
    sq = _f16(zm * zm)
    var = _f16(_sum16(sq, axes, True) / np.float32(n))
    rstd = _f16(np.float32(1) / np.sqrt(_f16(var + eps)))
    rstd = _poison(rstd, ~np.isfinite(var))
    y = _f16(zm * rstd)
    if gamma is not None:
        y = _f16(y * gamma)
    if beta is not None:
        y = y + beta
    return y


@_op("layer_norm")
def _layer_norm(a, ctx):
    x = _f32(a["x"])
    axes = _reduce_axes(x, a.get("axes"))
    eps = a.get("epsilon")
    eps = 1e-5 if eps is None else eps
    return _normalize(x, axes, eps, _gamma_beta(a.get("gamma"), x, axes), _gamma_beta(a.get("beta"), x, axes),
                      ctx.pessimistic)


@_op("instance_norm")
def _instance_norm(a, ctx):
    x = _f32(a["x"])
    axes = list(range(2, x.ndim))
    eps = a.get("epsilon")
    eps = 1e-5 if eps is None else eps
    g = None if a.get("gamma") is None else _channel_param(a["gamma"], x)
    b = None if a.get("beta") is None else _channel_param(a["beta"], x)
    return _normalize(x, axes, eps, g, b, ctx.pessimistic)


@_op("batch_norm")
def _batch_norm(a, ctx):
    x = _f32(a["x"])
    mean = _channel_param(a["mean"], x)
    var = _channel_param(a["variance"], x)
    eps = a.get("epsilon")
    eps = np.float32(1e-5 if eps is None else eps)
    g = None if a.get("gamma") is None else _channel_param(a["gamma"], x)
    b = None if a.get("beta") is None else _channel_param(a["beta"], x)
    if not ctx.pessimistic:
        y = (x - mean) / np.sqrt(var + eps)
        if g is not None:
            y = y * g
        return y if b is None else y + b
    rstd = _f16(np.float32(1) / np.sqrt(_f16(var + eps)))
    y = _f16(_f16(x - mean) * rstd)
    if g is not None:
        y = _f16(y * g)
    return y if b is None else y + b


@_op("l2_norm")
def _l2_norm(a, ctx):
    x = _f32(a["x"])
    eps = a.get("epsilon")
    eps = np.float32(1e-6 if eps is None else eps)
    axes = list(range(max(x.ndim - 3, 0), x.ndim))
    if not ctx.pessimistic:
        return x / np.sqrt(np.sum(x * x, axis=tuple(axes), keepdims=True) + eps)
    ss = _sum16(_f16(x * x), axes, True)
    denom = _f16(np.sqrt(_f16(ss + eps)))
    return _poison(x / denom, ~np.isfinite(ss))


def _keep(a):
    return _bool(a.get("keep_dims"), False)


def _reduction(kind):
    def run(a, ctx):
        x = np.asarray(a["x"])
        axes = _reduce_axes(x, a.get("axes"))
        keep = _keep(a)
        ax = tuple(axes)
        p = ctx.pessimistic and x.dtype.kind == "f"
        if kind == "max":
            return np.max(x, axis=ax, keepdims=keep)
        if kind == "min":
            return np.min(x, axis=ax, keepdims=keep)
        if kind == "prod":
            return np.prod(x, axis=ax, keepdims=keep)
        x = _f32(x) if kind != "sum" or x.dtype.kind == "f" else x
        if kind == "sum":
            return _sum16(x, axes, keep) if p else np.sum(x, axis=ax, keepdims=keep)
        if kind == "mean":
            n = np.float32(_count(x, axes))
            return _f16(_sum16(x, axes, keep)) / n if p else np.mean(x, axis=ax, keepdims=keep, dtype=_F32)
        if kind == "l1_norm":
            return _sum16(np.abs(x), axes, keep) if p else np.sum(np.abs(x), axis=ax, keepdims=keep)
        if kind == "sum_square":
            return _sum16(_f16(x * x), axes, keep) if p else np.sum(x * x, axis=ax, keepdims=keep)
        if kind == "l2_norm":
            if p:
                return np.sqrt(_sum16(_f16(x * x), axes, keep))
            return np.sqrt(np.sum(x * x, axis=ax, keepdims=keep))
        if kind == "log_sum":
            return np.log(_sum16(x, axes, keep) if p else np.sum(x, axis=ax, keepdims=keep))
        if kind == "log_sum_exp":
            m = np.max(x, axis=ax, keepdims=True)
            m = np.where(np.isfinite(m), m, np.float32(0))
            if p:
                s = _sum16(_f16(np.exp(_f16(x - m))), axes, True)
                r = _f16(np.log(s)) + m
            else:
                r = np.log(np.sum(np.exp(x - m), axis=ax, keepdims=True)) + m
            return r if keep else np.squeeze(r, axis=ax)
        raise AssertionError(kind)

    return run


for _kind in ("max", "min", "prod", "sum", "mean", "l1_norm", "l2_norm", "sum_square", "log_sum", "log_sum_exp"):
    _OPS["reduce_" + _kind] = _reduction(_kind)


def _arg_reduce(fn):
    def run(a, ctx):
        x = np.asarray(a["x"])
        axis = _norm_axis(a.get("axis") if a.get("axis") is not None else -1, x.ndim)
        r = fn(x, axis=axis)
        if _keep(a):
            r = np.expand_dims(r, axis)
        return r.astype(np.int32)

    return run


_OPS["reduce_argmax"] = _arg_reduce(np.argmax)
_OPS["reduce_argmin"] = _arg_reduce(np.argmin)


@_op("scaled_dot_product_attention")
def _sdpa(a, ctx):
    q, k, v = _f32(a["query"]), _f32(a["key"]), _f32(a["value"])
    scale = np.float32(1.0 / math.sqrt(q.shape[-1]))
    p = ctx.pessimistic
    s = np.matmul(q, np.swapaxes(k, -1, -2))
    if p:
        s = _f16(_f16(s) * scale)
    else:
        s = s * scale
    mask = a.get("attn_mask")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.dtype == bool:
            s = np.where(mask, s, np.float32(-np.inf))
        else:
            s = s + _f32(mask)
    s = _f16(s)  # scores are materialized in float16
    w = _f16(_softmax_core(s, s.ndim - 1, p))
    return np.matmul(w, v)


@_op("cumsum")
def _cumsum(a, ctx):
    x = np.asarray(a["x"])
    axis = _norm_axis(a.get("axis") if a.get("axis") is not None else 0, x.ndim)
    exclusive = _bool(a.get("exclusive"))
    reverse = _bool(a.get("reverse"))
    if reverse:
        x = np.flip(x, axis)
    if ctx.pessimistic and x.dtype.kind == "f":
        xm = np.moveaxis(_f32(x), axis, 0)
        out = np.empty_like(xm)
        acc = np.zeros(xm.shape[1:], _F32)
        for i in range(xm.shape[0]):
            acc = _f16(acc + xm[i])
            out[i] = acc
        y = np.moveaxis(out, 0, axis)
    else:
        y = np.cumsum(x, axis=axis, dtype=_F32 if x.dtype.kind == "f" else None)
    if exclusive:
        y = np.concatenate([np.zeros_like(np.take(y, [0], axis=axis)), np.take(y, np.arange(y.shape[axis] - 1), axis=axis)], axis=axis)
    if reverse:
        y = np.flip(y, axis)
    return y


# ---- gather / scatter -----------------------------------------------------------------

def _check_indices(idx, size, ctx, what="index"):
    idx = np.asarray(idx)
    if idx.dtype.kind not in "iu":
        if idx.dtype.kind == "f" and np.all(np.isfinite(idx)) and np.all(idx == np.trunc(idx)):
            idx = idx.astype(np.int64)
        else:
            raise EmulationError(f"{ctx.where()}: {what} tensor is not integer ({idx.dtype})")
    if idx.size:
        lo, hi = int(idx.min()), int(idx.max())
        if lo < -size or hi >= size:
            bad = hi if hi >= size else lo
            raise EmulationError(f"{ctx.where()}: {what} {bad} is out of range for a dimension of size {size}")
    return idx.astype(np.int64) if idx.dtype != np.int64 else idx


@_op("gather")
def _gather(a, ctx):
    x = np.asarray(a["x"])
    axis = _norm_axis(a.get("axis") if a.get("axis") is not None else 0, x.ndim)
    bd = _int(a["batch_dims"]) if a.get("batch_dims") is not None else 0
    idx = _check_indices(a["indices"], x.shape[axis], ctx)
    if bd == 0:
        return np.take(x, idx, axis=axis)
    bshape = x.shape[:bd]
    nb = int(np.prod(bshape))
    xr = x.reshape((nb,) + x.shape[bd:])
    ir = idx.reshape((nb,) + idx.shape[bd:])
    res = np.stack([np.take(xr[i], ir[i], axis=axis - bd) for i in range(nb)])
    return res.reshape(tuple(bshape) + res.shape[1:])


@_op("gather_along_axis")
def _gather_along_axis(a, ctx):
    x = np.asarray(a["x"])
    axis = _norm_axis(a.get("axis") if a.get("axis") is not None else 0, x.ndim)
    idx = _check_indices(a["indices"], x.shape[axis], ctx)
    return np.take_along_axis(x, idx, axis=axis)


@_op("gather_nd")
def _gather_nd(a, ctx):
    x = np.asarray(a["x"])
    idx = np.asarray(a["indices"])
    bd = _int(a["batch_dims"]) if a.get("batch_dims") is not None else 0
    k = idx.shape[-1]
    bshape = x.shape[:bd]
    nb = int(np.prod(bshape)) if bd else 1
    xr = x.reshape((nb,) + x.shape[bd:])
    ir = idx.reshape((nb, -1, k))
    cols = [_check_indices(ir[..., j], xr.shape[1 + j], ctx) for j in range(k)]
    bidx = np.arange(nb)[:, None]
    out = xr[(bidx,) + tuple(cols)]
    return out.reshape(tuple(bshape) + idx.shape[bd:-1] + x.shape[bd + k:])


_SCATTER_UFUNCS = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide,
    "max": np.maximum, "min": np.minimum,
}


def _scatter_apply(data, index, updates, mode, ctx):
    mode = _str(mode, "add")
    if mode == "update":
        data[index] = updates
    elif mode in _SCATTER_UFUNCS:
        _SCATTER_UFUNCS[mode].at(data, index, updates)
    else:
        raise UnsupportedOpError(f"{ctx.where()}: scatter mode {mode!r} is not supported")
    return data


@_op("scatter")
def _scatter(a, ctx):
    data = np.array(a["data"], copy=True)
    axis = _norm_axis(a.get("axis") if a.get("axis") is not None else 0, data.ndim)
    idx = _check_indices(a["indices"], data.shape[axis], ctx)
    d = np.moveaxis(data, axis, 0)
    u = np.moveaxis(np.asarray(a["updates"], data.dtype), axis, 0)
    _scatter_apply(d, idx, u, a.get("mode"), ctx)
    return data


@_op("scatter_along_axis")
def _scatter_along_axis(a, ctx):
    data = np.array(a["data"], copy=True)
    axis = _norm_axis(a.get("axis") if a.get("axis") is not None else 0, data.ndim)
    idx = _check_indices(a["indices"], data.shape[axis], ctx)
    idx = np.where(idx < 0, idx + data.shape[axis], idx)
    grid = list(np.indices(idx.shape, sparse=True))
    grid[axis] = idx
    return _scatter_apply(data, tuple(grid), np.asarray(a["updates"], data.dtype), a.get("mode"), ctx)


@_op("scatter_nd")
def _scatter_nd(a, ctx):
    data = np.array(a["data"], copy=True)
    idx = np.asarray(a["indices"])
    k = idx.shape[-1]
    cols = tuple(_check_indices(idx[..., j], data.shape[j], ctx) for j in range(k))
    return _scatter_apply(data, cols, np.asarray(a["updates"], data.dtype), a.get("mode"), ctx)


# ---- shape / data movement ------------------------------------------------------------

@_op("reshape")
def _reshape(a, ctx):
    x = np.asarray(a["x"])
    shape = _ints(a["shape"])
    if 0 in shape:  # 0 copies the matching dim of x, right-aligned (iOS17 rule; same as iOS15 when ranks match)
        xs = list(x.shape)[::-1]
        rs = shape[::-1]
        rs = [(xs[i] if i < len(xs) else 1) if d == 0 else d for i, d in enumerate(rs)]
        shape = rs[::-1]
    return x.reshape(shape)


@_op("expand_dims")
def _expand_dims(a, ctx):
    x = np.asarray(a["x"])
    axes = _ints(a["axes"])
    out_rank = x.ndim + len(axes)
    axes = sorted(ax + out_rank if ax < 0 else ax for ax in axes)
    shape = list(x.shape)
    for ax in axes:
        shape.insert(ax, 1)
    return x.reshape(shape)


@_op("squeeze")
def _squeeze(a, ctx):
    x = np.asarray(a["x"])
    if a.get("axes") is None:
        return np.squeeze(x)
    return np.squeeze(x, axis=tuple(_norm_axes(a["axes"], x.ndim)))


@_op("transpose")
def _transpose(a, ctx):
    return np.transpose(a["x"], _ints(a["perm"]))


@_op("tile")
def _tile(a, ctx):
    return np.tile(a["x"], _ints(a["reps"]))


@_op("concat")
def _concat(a, ctx):
    vals = [np.asarray(v) for v in a["values"]]
    if any(v.ndim == 0 for v in vals):  # MIL concatenates scalars as length-1 vectors
        vals = [np.atleast_1d(v) for v in vals]
    axis = _norm_axis(a["axis"], vals[0].ndim)
    if _bool(a.get("interleave")):
        st = np.stack(vals, axis=axis + 1)
        shape = list(vals[0].shape)
        shape[axis] *= len(vals)
        return st.reshape(shape)
    return np.concatenate(vals, axis=axis)


@_op("stack")
def _stack(a, ctx):
    vals = [np.asarray(v) for v in a["values"]]
    return np.stack(vals, axis=_norm_axis(a["axis"], vals[0].ndim + 1))


@_op("split")
def _split(a, ctx):
    x = np.asarray(a["x"])
    axis = _norm_axis(a["axis"], x.ndim)
    dim = x.shape[axis]
    if a.get("split_sizes") is not None:
        sizes = _ints(a["split_sizes"])
    else:
        n = _int(a["num_splits"]) if a.get("num_splits") is not None else ctx.n_out
        if dim % n:
            raise EmulationError(f"{ctx.where()}: num_splits {n} does not divide dimension {dim}")
        sizes = [dim // n] * n
    if sum(sizes) != dim:
        raise EmulationError(f"{ctx.where()}: split sizes {sizes} do not add up to {dim}")
    return tuple(np.split(x, np.cumsum(sizes)[:-1], axis=axis))


def _slices(x, begin, end, stride, begin_mask, end_mask, squeeze_mask):
    rank = x.ndim
    begin = _ints(begin)
    end = _ints(end)
    stride = _ints(stride) if stride is not None else [1] * rank
    bm = [bool(v) for v in np.asarray(begin_mask).reshape(-1)] if begin_mask is not None else [False] * rank
    em = [bool(v) for v in np.asarray(end_mask).reshape(-1)] if end_mask is not None else [False] * rank
    sm = [bool(v) for v in np.asarray(squeeze_mask).reshape(-1)] if squeeze_mask is not None else [False] * rank
    sl = []
    for i in range(rank):
        if sm[i]:
            b = begin[i] + x.shape[i] if begin[i] < 0 else begin[i]
            sl.append(b)
        else:
            sl.append(slice(None if bm[i] else begin[i], None if em[i] else end[i], stride[i]))
    return tuple(sl)


@_op("slice_by_index")
def _slice_by_index(a, ctx):
    x = np.asarray(a["x"])
    return x[_slices(x, a["begin"], a["end"], a.get("stride"), a.get("begin_mask"), a.get("end_mask"),
                     a.get("squeeze_mask"))]


@_op("slice_update")
def _slice_update(a, ctx):
    x = np.array(a["x"], copy=True)
    sl = _slices(x, a["begin"], a["end"], a.get("stride"), a.get("begin_mask"), a.get("end_mask"),
                 a.get("squeeze_mask"))
    x[sl] = a["update"]
    return x


@_op("slice_by_size")
def _slice_by_size(a, ctx):
    x = np.asarray(a["x"])
    begin, size = _ints(a["begin"]), _ints(a["size"])
    sl = []
    for i in range(x.ndim):
        b = begin[i] + x.shape[i] if begin[i] < 0 else begin[i]
        sl.append(slice(b, None) if size[i] < 0 else slice(b, b + size[i]))
    return x[tuple(sl)]


@_op("reverse")
def _reverse(a, ctx):
    x = np.asarray(a["x"])
    axes = range(x.ndim) if a.get("axes") is None else _norm_axes(a["axes"], x.ndim)
    return np.flip(x, axis=tuple(axes))


@_op("flatten2d")
def _flatten2d(a, ctx):
    x = np.asarray(a["x"])
    axis = _norm_axis(a.get("axis") if a.get("axis") is not None else 1, x.ndim)
    return x.reshape(int(np.prod(x.shape[:axis])), int(np.prod(x.shape[axis:])))


@_op("reshape_like")
def _reshape_like(a, ctx):
    x = np.asarray(a["x"])
    refs = a["ref_tensors"]
    begins, ends, masks = _ints(a["begins"]), _ints(a["ends"]), [bool(m) for m in np.asarray(a["end_masks"]).reshape(-1)]
    shape = []
    for r, b, e, m in zip(refs, begins, ends, masks):
        s = np.shape(r)
        shape.extend(s[b:] if m else s[b:e])
    return x.reshape(shape)


@_op("shape")
def _shape(a, ctx):
    return np.asarray(np.shape(a["x"]), np.int32)


@_op("range_1d")
def _range_1d(a, ctx):
    start, end, step = np.asarray(a["start"]), np.asarray(a["end"]), np.asarray(a["step"])
    if _is_float(start, end, step):
        return np.arange(float(start), float(end), float(step), dtype=_F32)
    return np.arange(int(start), int(end), int(step), dtype=np.int32)


@_op("fill")
def _fill(a, ctx):
    v = a.get("value")
    v = np.float32(0) if v is None else np.asarray(v)
    return np.full(tuple(_ints(a["shape"])), v, dtype=v.dtype)


@_op("fill_like")
def _fill_like(a, ctx):
    v = a.get("value")
    v = np.float32(0) if v is None else np.asarray(v)
    return np.full(np.shape(a["ref_tensor"]), v, dtype=v.dtype)


@_op("band_part")
def _band_part(a, ctx):
    x = np.asarray(a["x"])
    lower = _int(a["lower"]) if a.get("lower") is not None else -1
    upper = _int(a["upper"]) if a.get("upper") is not None else -1
    m, n = x.shape[-2], x.shape[-1]
    d = np.arange(m)[:, None] - np.arange(n)[None, :]  # m - n
    keep = np.ones((m, n), bool)
    if lower >= 0:
        keep &= d <= lower
    if upper >= 0:
        keep &= -d <= upper
    return np.where(keep, x, np.zeros((), x.dtype))


@_op("topk")
def _topk(a, ctx):
    x = np.asarray(a["x"])
    k = _int(a["k"]) if a.get("k") is not None else 1
    axis = _norm_axis(a.get("axis") if a.get("axis") is not None else -1, x.ndim)
    asc = _bool(a.get("ascending"))
    key = x if asc else -x.astype(np.float64) if x.dtype.kind != "b" else ~x
    order = np.argsort(key, axis=axis, kind="stable")
    idx = np.take(order, np.arange(k), axis=axis)
    vals = np.take_along_axis(x, idx, axis=axis)
    if ctx.n_out == 1:
        return vals
    return vals, idx.astype(np.int32)


@_op("argsort")
def _argsort(a, ctx):
    x = np.asarray(a["x"])
    axis = _norm_axis(a.get("axis") if a.get("axis") is not None else -1, x.ndim)
    asc = _bool(a.get("ascending"))
    key = x if asc else -x.astype(np.float64)
    return np.argsort(key, axis=axis, kind="stable").astype(np.int32)


@_op("one_hot")
def _one_hot(a, ctx):
    idx = np.asarray(a["indices"]).astype(np.int64)
    depth = _int(a["one_hot_vector_size"])
    axis = _int(a["axis"]) if a.get("axis") is not None else -1
    on = np.asarray(a.get("on_value") if a.get("on_value") is not None else 1)
    off = np.asarray(a.get("off_value") if a.get("off_value") is not None else 0)
    hot = idx[..., None] == np.arange(depth)
    out = np.where(hot, on, off)
    out_rank = idx.ndim + 1
    axis = axis + out_rank if axis < 0 else axis
    return np.moveaxis(out, -1, axis)


@_op("pad")
def _pad(a, ctx):
    x = np.asarray(a["x"])
    p = _ints(a["pad"])
    n = len(p) // 2
    widths = [(0, 0)] * (x.ndim - n) + [(p[2 * i], p[2 * i + 1]) for i in range(n)]
    mode = _str(a.get("mode"), "constant")
    if mode == "constant":
        cv = a.get("constant_val")
        return np.pad(x, widths, mode="constant", constant_values=0 if cv is None else np.asarray(cv).item())
    if mode == "reflect":
        return np.pad(x, widths, mode="reflect")
    if mode == "replicate":
        return np.pad(x, widths, mode="edge")
    raise UnsupportedOpError(f"{ctx.where()}: pad mode {mode!r} is not supported")


@_op("non_zero")
def _non_zero(a, ctx):
    return np.argwhere(np.asarray(a["x"])).astype(np.int32)


@_op("sliding_windows")
def _sliding_windows(a, ctx):
    x = np.asarray(a["x"])
    axis = _norm_axis(a["axis"], x.ndim)
    size = _int(a["size"])
    stride = _int(a["stride"]) if a.get("stride") is not None else 1
    w = np.lib.stride_tricks.sliding_window_view(x, size, axis=axis)  # window dim appended last
    w = np.take(w, np.arange(0, w.shape[axis], stride), axis=axis)
    return np.moveaxis(w, -1, axis + 1)


# ---- activation quantization (iOS 17 quantize / dequantize) --------------------------------

def _quant_params(a, x):
    """scale and zero point (0 when absent) broadcast against x: scalars, or vectors along `axis`."""
    axis = a.get("axis")
    axis = None if axis is None else _int(axis)
    scale = np.asarray(a["scale"], dtype=np.float32)
    zp = a.get("zero_point")
    zp = np.zeros((), np.float32) if zp is None else np.asarray(zp).astype(np.float32)
    if scale.ndim and axis is None:
        raise EmulationError("quantize/dequantize: a vector scale needs an axis")
    if scale.ndim:
        scale, zp = _promote_to_rank(scale, x, axis), _promote_to_rank(zp, x, axis)
    return scale, zp


@_op("quantize")
def _quantize(a, ctx):
    """q = clip(round(x / scale) + zero_point) to the output dtype's full range; rounding half to even
    (coremltools' reference, np.around). Exact in both modes: one division and one rounding."""
    x = _f32(a["input"])
    dtype = _INT_DTYPES[_str(a["output_dtype"])]
    scale, zp = _quant_params(a, x)
    if x.size and not np.all(np.isfinite(x)):
        raise EmulationError(f"{ctx.where()}: cannot quantize non-finite values")
    info = np.iinfo(dtype)
    return np.clip(np.rint(x / scale) + zp, info.min, info.max).astype(dtype)


@_op("dequantize")
def _dequantize(a, ctx):
    """x = scale * (q - zero_point), rounded to float16 like every float output."""
    q = np.asarray(a["input"])
    scale, zp = _quant_params(a, q)
    return (q.astype(np.float32) - zp) * scale


# ---- compile-time (constexpr) decompression ---------------------------------------------

def _unpack_bits(packed, nbits, count):
    bits = np.unpackbits(np.asarray(packed).astype(np.uint8).reshape(-1), bitorder="little")
    bits = bits[: count * nbits].reshape(count, nbits).astype(np.uint32)
    return (bits << np.arange(nbits, dtype=np.uint32)).sum(axis=1)


def _promote_to_rank(param, data, axis):
    param = np.asarray(param)
    if param.ndim == data.ndim:
        return param
    if param.ndim == 0:
        return param.reshape([1] * data.ndim)
    axis = axis + data.ndim if axis < 0 else axis
    shape = [1] * data.ndim
    shape[axis] = -1
    return param.reshape(shape)


def _block_repeat(p, shape):
    """Repeat a per-block parameter (scale, offset, lut leading dims) up to `shape`."""
    for ax, (d, s) in enumerate(zip(shape, p.shape)):
        if s != d:
            if s == 0 or d % s:
                raise EmulationError(f"block parameter shape {p.shape} does not divide data shape {tuple(shape)}")
            p = np.repeat(p, d // s, axis=ax)
    return p


@_op("constexpr_affine_dequantize")
def _cx_affine_dequantize(a, ctx):
    q = np.asarray(a["quantized_data"])
    axis = _int(a["axis"])
    scale = _promote_to_rank(a["scale"], q, axis).astype(np.float32)
    zp = _promote_to_rank(a["zero_point"], q, axis).astype(np.float32)
    return (q.astype(np.float32) - zp) * scale


@_op("constexpr_cast")
def _cx_cast(a, ctx):
    return _f32(a["source_val"])


def _lut_iOS18(indices, lut, vector_axis):
    indices = np.asarray(indices).astype(np.int64)
    lut = np.asarray(lut)
    r = indices.ndim
    vsize = lut.shape[-1]
    # leading lut dims are per-block tables: block index = position // block size
    grid = []
    for ax in range(r):
        n, g = indices.shape[ax], lut.shape[ax]
        b = n // g
        sh = [1] * r
        sh[ax] = n
        grid.append((np.arange(n) // b).reshape(sh))
    out = lut[tuple(grid) + (indices,)]  # indices.shape + (vsize,)
    if vsize == 1:
        return out[..., 0]
    ax = vector_axis + r if vector_axis < 0 else vector_axis
    out = np.moveaxis(out, -1, ax + 1)
    shape = list(indices.shape)
    shape[ax] *= vsize
    return out.reshape(shape)


@_op("constexpr_lut_to_dense")
def _cx_lut_to_dense(a, ctx):
    lut = np.asarray(a["lut"])
    if a.get("shape") is not None:  # iOS16: packed uint8 indices, 1-D lut
        shape = _ints(a["shape"])
        nbits = int(round(math.log2(lut.size)))
        idx = _unpack_bits(a["indices"], nbits, int(np.prod(shape)))
        return lut[idx].reshape(shape)
    va = a.get("vector_axis")
    return _lut_iOS18(a["indices"], lut, None if va is None else _int(va))


def _sparse_dense(nonzero, mask):
    mask = np.asarray(mask)
    out = np.zeros(mask.shape, dtype=np.asarray(nonzero).dtype)
    out[mask != 0] = nonzero
    return out


@_op("constexpr_sparse_to_dense")
def _cx_sparse_to_dense(a, ctx):
    nz = np.asarray(a["nonzero_data"])
    if a.get("shape") is not None:  # iOS16: bit-packed mask
        shape = _ints(a["shape"])
        count = int(np.prod(shape))
        bits = np.unpackbits(np.asarray(a["mask"]).astype(np.uint8).reshape(-1), bitorder="little")[:count]
        return _sparse_dense(nz, bits.reshape(shape))
    return _sparse_dense(nz, a["mask"])


def _shift_scale(data, scale, offset):
    data = np.asarray(data)
    scale = np.asarray(scale)
    d = data.astype(np.float32)
    if offset is not None:
        d = d - _block_repeat(np.asarray(offset), data.shape).astype(np.float32)
    return d * _block_repeat(scale, data.shape).astype(np.float32)


@_op("constexpr_blockwise_shift_scale")
def _cx_blockwise_shift_scale(a, ctx):
    return _shift_scale(a["data"], a["scale"], a.get("offset"))


@_op("constexpr_sparse_blockwise_shift_scale")
def _cx_sparse_blockwise_shift_scale(a, ctx):
    mask = np.asarray(a["data_mask"])
    dense = _sparse_dense(a["nonzero_data"], mask)
    deq = _shift_scale(dense, a["scale"], a.get("offset"))
    return mask, deq[mask != 0].reshape(-1)


@_op("constexpr_lut_to_sparse")
def _cx_lut_to_sparse(a, ctx):
    mask = np.asarray(a["indices_mask"])
    idx = _sparse_dense(a["indices_nonzero_data"], mask)
    lut = np.asarray(a["lut"])
    va = a.get("vector_axis")
    va = None if va is None else _int(va)
    dense = _lut_iOS18(idx, lut, va)
    if va is not None and lut.shape[-1] > 1:
        mask = np.repeat(mask, lut.shape[-1], axis=va)
    return mask, dense[mask != 0].reshape(-1)


# Ops that only move/select float values: their float outputs are already float16 values
# when their inputs are, so rounding them again is skipped (pure speed optimization).
_MOVEMENT_OPS = frozenset({
    "reshape", "expand_dims", "squeeze", "transpose", "tile", "concat", "stack", "split",
    "slice_by_index", "slice_by_size", "gather", "gather_nd", "gather_along_axis",
    "identity", "flatten2d", "reverse", "reshape_like", "select", "band_part",
    "maximum", "minimum", "relu", "clip", "threshold", "abs", "sliding_windows",
})


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------

def _ct():
    from quiet_coremltools import import_coremltools

    return import_coremltools()


def _read_package(package_path):
    """Return (spec, weights_dir) for an .mlpackage, or raise NotAnMLPackageError."""
    p = os.fspath(package_path)
    if not os.path.exists(p):
        raise NotAnMLPackageError(f"no such .mlpackage: {p}")
    if not os.path.isdir(p):
        raise NotAnMLPackageError(f"not an .mlpackage (not a directory): {p}")
    manifest = os.path.join(p, "Manifest.json")
    if not os.path.isfile(manifest):
        raise NotAnMLPackageError(f"not an .mlpackage (no Manifest.json): {p}")
    model_file = None
    try:
        with open(manifest) as f:
            m = json.load(f)
        entry = m["itemInfoEntries"][m["rootModelIdentifier"]]
        model_file = os.path.join(p, "Data", entry["path"])
    except (OSError, ValueError, KeyError, TypeError):
        model_file = None
    if model_file is None or not os.path.isfile(model_file):
        model_file = os.path.join(p, "Data", "com.apple.CoreML", "model.mlmodel")
    if not os.path.isfile(model_file):
        raise NotAnMLPackageError(f"not an .mlpackage (no model specification file): {p}")
    _ct()
    from coremltools.proto import Model_pb2

    spec = Model_pb2.Model()
    try:
        with open(model_file, "rb") as f:
            spec.ParseFromString(f.read())
    except Exception as e:  # protobuf DecodeError and friends
        raise NotAnMLPackageError(f"unreadable model specification in {p}: {type(e).__name__}") from None
    kind = spec.WhichOneof("Type")
    if kind != "mlProgram":
        raise NotAnMLPackageError(f"not an ML Program package ({kind or 'empty'} model): {p}")
    return spec, os.path.join(os.path.dirname(model_file), "weights")


_ARRAY_DTYPES = {
    "FLOAT16": np.float16, "FLOAT32": np.float32, "DOUBLE": np.float64, "INT32": np.int32, "INT8": np.int8,
}

# MIL proto DataType name -> (numpy storage dtype, bit width for sub-byte types or 0, signed)
_MIL_DTYPES = {
    "BOOL": (np.dtype(bool), 0, False),
    "STRING": (None, 0, False),
    "FLOAT16": (np.dtype(np.float16), 0, True),
    "FLOAT32": (np.dtype(np.float32), 0, True),
    "FLOAT64": (np.dtype(np.float64), 0, True),
    "INT8": (np.dtype(np.int8), 0, True),
    "INT16": (np.dtype(np.int16), 0, True),
    "INT32": (np.dtype(np.int32), 0, True),
    "INT64": (np.dtype(np.int64), 0, True),
    "UINT8": (np.dtype(np.uint8), 0, False),
    "UINT16": (np.dtype(np.uint16), 0, False),
    "UINT32": (np.dtype(np.uint32), 0, False),
    "UINT64": (np.dtype(np.uint64), 0, False),
    "INT4": (np.dtype(np.int8), 4, True),
    "UINT1": (np.dtype(np.uint8), 1, False),
    "UINT2": (np.dtype(np.uint8), 2, False),
    "UINT3": (np.dtype(np.uint8), 3, False),
    "UINT4": (np.dtype(np.uint8), 4, False),
    "UINT6": (np.dtype(np.uint8), 6, False),
}
_FLOAT_NAMES = frozenset({"FLOAT16", "FLOAT32", "FLOAT64"})

# Blob reader method per dtype (coremltools' native MIL weight-file reader)
_BLOB_READERS = {
    "FLOAT16": "read_fp16_data", "FLOAT32": "read_float_data", "INT32": "read_int32_data",
    "UINT32": "read_uint32_data", "INT16": "read_int16_data", "UINT16": "read_uint16_data",
    "INT8": "read_int8_data", "UINT8": "read_uint8_data", "INT4": "read_int4_data",
    "UINT1": "read_uint1_data", "UINT2": "read_uint2_data", "UINT3": "read_uint3_data",
    "UINT4": "read_uint4_data", "UINT6": "read_uint6_data",
}

# Parameters that are always a tuple of tensors (TupleInputType in the MIL op definitions).
_TUPLE_PARAMS = frozenset({("concat", "values"), ("stack", "values"), ("einsum", "values"),
                           ("reshape_like", "ref_tensors")})


def _unpack_sub_byte(raw: bytes, nbits: int, signed: bool, count: int) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(raw, np.uint8), bitorder="little")[: count * nbits]
    vals = (bits.reshape(count, nbits).astype(np.int32) << np.arange(nbits, dtype=np.int32)).sum(axis=1)
    if signed:
        vals = np.where(vals >= (1 << (nbits - 1)), vals - (1 << nbits), vals)
        return vals.astype(np.int8)
    return vals.astype(np.uint8)


class _ProtoReader:
    """Decodes MIL proto values (immediate and weight-file) into NumPy."""

    def __init__(self, weights_dir):
        from coremltools.proto import MIL_pb2

        self.weights_dir = weights_dir
        self._dtype_name = MIL_pb2.DataType.Name
        self._blob_readers = {}

    def tensor_type(self, value_type):
        """(dtype name, shape with None for unknown dims) of a ValueType, or (kind, None)."""
        which = value_type.WhichOneof("type")
        if which != "tensorType":
            return which, None
        tt = value_type.tensorType
        shape = tuple(
            d.constant.size if d.WhichOneof("dimension") == "constant" else None for d in tt.dimensions
        )
        return self._dtype_name(tt.dataType), shape

    def kind(self, value_type, where):
        """'f' for floats, a numpy dtype for ints/bool, None for strings."""
        name, _ = self.tensor_type(value_type)
        if name in _FLOAT_NAMES:
            return "f"
        if name == "STRING":
            return None
        if name in _MIL_DTYPES and _MIL_DTYPES[name][1] == 0:
            return _MIL_DTYPES[name][0]
        if name in _MIL_DTYPES:  # sub-byte ints are held unpacked
            return _MIL_DTYPES[name][0]
        raise UnsupportedOpError(f"{where}: value type {name} is not supported")

    def value(self, v, where):
        """A proto Value -> numpy array (float tensors rounded to float16, stored as float32),
        or a Python str for string scalars."""
        name, shape = self.tensor_type(v.type)
        if shape is None:
            raise UnsupportedOpError(f"{where}: {name} values are not supported")
        if name not in _MIL_DTYPES:
            raise UnsupportedOpError(f"{where}: value type {name} is not supported")
        npdt, nbits, signed = _MIL_DTYPES[name]
        if any(d is None for d in shape):
            raise UnsupportedOpError(f"{where}: constant with unknown shape")
        count = int(np.prod(shape)) if shape else 1
        which = v.WhichOneof("value")
        if which == "blobFileValue":
            fname = os.path.join(self.weights_dir, v.blobFileValue.fileName.split("/")[-1])
            reader = self._blob_readers.get(fname)
            if reader is None:
                from coremltools.libmilstoragepython import _BlobStorageReader

                reader = self._blob_readers[fname] = _BlobStorageReader(fname)
            if name not in _BLOB_READERS:
                raise UnsupportedOpError(f"{where}: weight-file values of type {name} are not supported")
            raw = np.asarray(getattr(reader, _BLOB_READERS[name])(v.blobFileValue.offset))
            arr = raw.view(np.float16) if name == "FLOAT16" else raw
            arr = arr.reshape(-1)[:count].reshape(shape)
        elif which == "immediateValue":
            iv = v.immediateValue
            if iv.WhichOneof("value") != "tensor":
                raise UnsupportedOpError(f"{where}: immediate {iv.WhichOneof('value')} values are not supported")
            tv = iv.tensor
            field = tv.WhichOneof("value")
            if field is None:
                vals = []
            else:
                vals = getattr(tv, field).values
            if name == "STRING":
                strs = [str(s) for s in vals]
                return strs[0] if not shape else np.array(strs).reshape(shape)
            if field == "bytes":
                raw = bytes(vals)
                if nbits:
                    arr = _unpack_sub_byte(raw, nbits, signed, count)
                else:
                    arr = np.frombuffer(raw, dtype=npdt)[:count].copy()
            else:
                arr = np.asarray(list(vals))
                if arr.size == 0:
                    arr = np.zeros((count,), npdt)
            arr = arr.astype(npdt).reshape(shape)
        else:
            raise UnsupportedOpError(f"{where}: value without data")
        if name == "FLOAT16":
            return arr.astype(_F32)
        if name in _FLOAT_NAMES:
            return _f16(arr)
        return np.asarray(arr)


class _Step:
    __slots__ = ("op_type", "name", "fn", "params", "outs", "kinds", "skip_round", "free", "ctx")


class MLProgramEmulator:
    """Execute one function of an ML Program ``.mlpackage`` with NumPy in float16 storage.

    See the module docstring for the numerics and the pessimistic mode.
    """

    def __init__(self, package_path, function_name: str = "main", pessimistic: bool = False):
        self.package_path = os.fspath(package_path)
        self.pessimistic = bool(pessimistic)
        spec, weights_dir = _read_package(package_path)
        self._spec = spec
        functions = spec.mlProgram.functions
        if function_name not in functions:
            default = getattr(spec.description, "defaultFunctionName", "")
            if function_name == "main" and default in functions:
                function_name = default
            else:
                raise ValueError(
                    f"function {function_name!r} not in {self.package_path} (has: {', '.join(sorted(functions))})"
                )
        self.function_name = function_name
        self._compile(functions[function_name], _ProtoReader(weights_dir))
        self._specs_cache = self.input_specs()

    # ---- compile the op list into a flat execution plan ---------------------------------

    def _compile(self, func, reader: _ProtoReader):
        if func.opset not in func.block_specializations:
            raise NotAnMLPackageError(f"function {self.function_name!r} has no block for opset {func.opset}")
        block = func.block_specializations[func.opset]
        ops = list(block.operations)
        self._op_type_counts = dict(Counter(op.type for op in ops))
        slot_of: Dict[str, int] = {}
        consts: Dict[str, object] = {}
        self.input_names: List[str] = []
        # op name -> parameter -> the names of the variables and constants it reads (e.g. a conv's weight
        # constant, whose name says which layer it is), for every op that runs
        self.op_inputs: Dict[str, Dict[str, List[str]]] = {}
        self._input_slots: Dict[str, int] = {}
        self._input_info = {}
        fp32_input_slots = set()
        for nvt in func.inputs:
            name = nvt.name
            dname, shape = reader.tensor_type(nvt.type)
            if shape is None:
                raise UnsupportedOpError(f"input '{name}' of type {dname} is not supported (stateful models)")
            kind = reader.kind(nvt.type, f"input '{name}'")
            s = len(slot_of)
            slot_of[name] = s
            self.input_names.append(name)
            self._input_slots[name] = s
            self._input_info[name] = (kind, dname == "FLOAT16", shape)
            if kind == "f" and dname != "FLOAT16":
                fp32_input_slots.add(s)

        def op_name(op, i):
            a = op.attributes.get("name")
            if a is not None:
                try:
                    return str(a.immediateValue.tensor.strings.values[0])
                except (IndexError, AttributeError):
                    pass
            return op.outputs[0].name if op.outputs else f"{op.type}_{i}"

        steps: List[_Step] = []
        for i, op in enumerate(ops):
            name = op_name(op, i)
            where = f"{op.type} op '{name}'"
            if len(op.blocks) or op.type in ("cond", "while_loop"):
                raise UnsupportedOpError(
                    f"unsupported op type '{op.type}' (op '{name}'): control flow / nested blocks are not emulated"
                )
            if op.type == "const":
                consts[op.outputs[0].name] = reader.value(op.attributes["val"], where)
                continue
            fn = _OPS.get(op.type)
            if fn is None:
                raise UnsupportedOpError(f"unsupported op type '{op.type}' (op '{name}')")
            kinds = [reader.kind(o.type, where) for o in op.outputs]
            ctx = _Ctx(self.pessimistic, name, op.type, len(op.outputs), kinds)
            params = []
            reads_fp32_input = False
            for pname, arg in op.inputs.items():
                refs = []
                for b in arg.arguments:
                    if b.WhichOneof("binding") == "name":
                        if b.name in consts:
                            refs.append((0, consts[b.name]))
                        elif b.name in slot_of:
                            refs.append((1, slot_of[b.name]))
                            reads_fp32_input |= slot_of[b.name] in fp32_input_slots
                        else:
                            raise NotAnMLPackageError(f"{where} reads '{b.name}' before it is defined")
                    else:
                        refs.append((0, reader.value(b.value, where)))
                if (op.type, pname) in _TUPLE_PARAMS or len(refs) != 1:
                    params.append((pname, 2, refs))
                else:
                    params.append((pname, refs[0][0], refs[0][1]))
            if op.type.startswith("constexpr_"):
                # compile-time decompression: every input is a constant (iOS16 ops may carry
                # their parameters as attributes)
                args = {k: reader.value(v, where) for k, v in op.attributes.items() if k != "name"}
                for pname, kind, ref in params:
                    if kind == 1 or (kind == 2 and any(k == 1 for k, _ in ref)):
                        raise UnsupportedOpError(f"{where}: constexpr op with a non-constant input '{pname}'")
                    args[pname] = [r for _, r in ref] if kind == 2 else ref
                res = fn(args, ctx)
                res = res if isinstance(res, tuple) else (res,)
                for o, val, kind in zip(op.outputs, res, kinds):
                    consts[o.name] = _f16(val) if kind == "f" else np.asarray(val, dtype=kind)
                continue
            st = _Step()
            st.op_type, st.name, st.fn, st.kinds, st.ctx = op.type, name, fn, kinds, ctx
            self.op_inputs[name] = {pname: [b.name for b in arg.arguments if b.WhichOneof("binding") == "name"]
                                    for pname, arg in op.inputs.items()}
            st.params = params
            st.skip_round = op.type in _MOVEMENT_OPS and not reads_fp32_input
            st.outs = []
            for o in op.outputs:
                s = len(slot_of)
                slot_of[o.name] = s
                st.outs.append(s)
            steps.append(st)

        out_types = {o.name: o.type for op in ops for o in op.outputs}
        out_types.update({nvt.name: nvt.type for nvt in func.inputs})
        self.output_names: List[str] = list(block.outputs)
        self._outputs = []  # (name, kind, 0 -> const value | 1 -> slot, ref)
        keep = set()
        for oname in block.outputs:
            kind = reader.kind(out_types[oname], f"output '{oname}'") if oname in out_types else "f"
            if oname in consts:
                self._outputs.append((oname, kind, 0, consts[oname]))
            else:
                s = slot_of[oname]
                keep.add(s)
                self._outputs.append((oname, kind, 1, s))

        # last use of every slot: free it right after that step
        last_use: Dict[int, int] = {}
        for i, st in enumerate(steps):
            for _, kind, ref in st.params:
                if kind == 1:
                    last_use[ref] = i
                elif kind == 2:
                    for k2, r2 in ref:
                        if k2 == 1:
                            last_use[r2] = i
            for s in st.outs:  # outputs never read are freed right away
                last_use.setdefault(s, i)
        free_at: Dict[int, List[int]] = {}
        for s, i in last_use.items():
            if s not in keep:
                free_at.setdefault(i, []).append(s)
        for i, st in enumerate(steps):
            st.free = free_at.get(i, [])
        self._steps = steps
        self._n_slots = len(slot_of)


    # ---- public API ---------------------------------------------------------------------------

    def op_type_counts(self) -> Dict[str, int]:
        """Number of ops of each type in the function (const ops included)."""
        return dict(self._op_type_counts)

    def input_specs(self) -> Dict[str, dict]:
        """name -> {"dtype": numpy dtype, "shape": default shape (tuple),
        "enumerated_shapes": list of tuples or None, "shape_range": list of (lo, hi|None) or None},
        read from the package's model description."""
        desc = self._spec.description
        inputs = desc.input
        for f in getattr(desc, "functions", []):
            if f.name == self.function_name:
                inputs = f.input
        out = {}
        for fd in inputs:
            t = fd.type
            if t.WhichOneof("Type") != "multiArrayType":
                out[fd.name] = {"dtype": None, "shape": None, "enumerated_shapes": None, "shape_range": None,
                                "type": t.WhichOneof("Type")}
                continue
            ma = t.multiArrayType
            from coremltools.proto import FeatureTypes_pb2

            dname = FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(ma.dataType)
            info = {
                "dtype": np.dtype(_ARRAY_DTYPES[dname]) if dname in _ARRAY_DTYPES else None,
                "shape": tuple(int(d) for d in ma.shape),
                "enumerated_shapes": None,
                "shape_range": None,
            }
            flex = ma.WhichOneof("ShapeFlexibility")
            if flex == "enumeratedShapes":
                info["enumerated_shapes"] = [tuple(int(d) for d in s.shape) for s in ma.enumeratedShapes.shapes]
            elif flex == "shapeRange":
                info["shape_range"] = [
                    (int(r.lowerBound), None if r.upperBound < 0 else int(r.upperBound))
                    for r in ma.shapeRange.sizeRanges
                ]
            out[fd.name] = info
        return out

    def _prepare_inputs(self, inputs) -> Dict[str, np.ndarray]:
        if not isinstance(inputs, dict):
            raise ValueError("inputs must be a dict mapping input names to arrays")
        missing = [n for n in self.input_names if n not in inputs]
        extra = [n for n in inputs if n not in self._input_slots]
        if missing or extra:
            parts = []
            if missing:
                parts.append("missing inputs: " + ", ".join(missing))
            if extra:
                parts.append("unexpected inputs: " + ", ".join(map(str, extra)))
            raise ValueError("; ".join(parts) + f" (expected: {', '.join(self.input_names)})")
        specs = self._specs_cache
        prepared = {}
        bad = []
        for name in self.input_names:
            arr = np.asarray(inputs[name])
            shape = tuple(arr.shape)
            kind, is_fp16, var_shape = self._input_info[name]
            spec = specs.get(name)
            ok = len(shape) == len(var_shape) and all(d is None or d == s for d, s in zip(var_shape, shape))
            allowed = str(tuple("?" if d is None else d for d in var_shape))
            if ok and spec is not None and spec.get("shape") is not None:
                if spec["enumerated_shapes"]:
                    ok = shape in spec["enumerated_shapes"]
                    allowed = " or ".join(str(s) for s in spec["enumerated_shapes"])
                elif spec["shape_range"]:
                    ok = len(shape) == len(spec["shape_range"]) and all(
                        lo <= s and (hi is None or s <= hi) for s, (lo, hi) in zip(shape, spec["shape_range"])
                    )
                    allowed = str(spec["shape_range"])
                elif all(d is not None for d in var_shape):
                    ok = shape == spec["shape"]
                    allowed = str(spec["shape"])
            if not ok:
                bad.append(f"{name} has shape {shape}, allowed {allowed}")
                continue
            if kind == "f":
                if arr.dtype.kind not in "fiub":
                    bad.append(f"{name} must be numeric, got {arr.dtype}")
                    continue
                a = _f16(arr) if is_fp16 else _f32(arr)
            elif kind is not None and kind.kind == "b":
                a = arr.astype(bool)
            else:
                if arr.dtype.kind not in "fiub" or (
                    arr.dtype.kind == "f" and arr.size and not np.all(arr == np.trunc(arr))
                ):
                    bad.append(f"{name} must hold integers ({kind.name}), got {arr.dtype}")
                    continue
                ctx = _Ctx(False, name, "input", 1, [kind])
                try:
                    a = _to_int(arr, kind, ctx)
                except EmulationError as e:
                    bad.append(f"{name}: {str(e).split(': ', 1)[-1]}")
                    continue
            prepared[name] = a
        if bad:
            raise ValueError("bad inputs: " + "; ".join(bad))
        return prepared

    def predict(self, inputs: Dict[str, np.ndarray], observe=None) -> Dict[str, np.ndarray]:
        """Run the function. `observe(op_name, op_type, value)` is called after every
        (non-const) op with its float16-rounded output (a read-only float32 array for float
        outputs); ops with several outputs (split, topk, ...) call it once per output.

        Returns output name -> array (floats as float32 arrays of float16 values)."""
        prepared = self._prepare_inputs(inputs)
        env: List[Optional[object]] = [None] * self._n_slots
        for name, a in prepared.items():
            env[self._input_slots[name]] = a
        with np.errstate(all="ignore"):
            for st in self._steps:
                args = {}
                for pname, kind, ref in st.params:
                    if kind == 1:
                        args[pname] = env[ref]
                    elif kind == 0:
                        args[pname] = ref
                    else:
                        args[pname] = [env[r] if k == 1 else r for k, r in ref]
                res = st.fn(args, st.ctx)
                if len(st.outs) == 1:
                    res = (res,)
                elif not isinstance(res, tuple) or len(res) != len(st.outs):
                    raise AssertionError(f"{st.ctx.where()} returned the wrong number of outputs")
                for s, val, kind in zip(st.outs, res, st.kinds):
                    val = self._finish(val, kind, st)
                    env[s] = val
                    if observe is not None:
                        view = val.view() if isinstance(val, np.ndarray) else val
                        if isinstance(view, np.ndarray):
                            view.flags.writeable = False
                        observe(st.name, st.op_type, view)
                for s in st.free:
                    env[s] = None
        out = {}
        for name, kind, k, ref in self._outputs:
            v = env[ref] if k == 1 else ref
            out[name] = np.array(v, dtype=_F32 if kind == "f" else None, copy=True)
        return out

    @staticmethod
    def _finish(val, kind, st):
        if kind == "f":
            a = np.asarray(val)
            if st.skip_round and a.dtype == _F32:
                return a
            return _f16(a)
        a = np.asarray(val)
        if kind is None or a.dtype == kind:
            return a
        if kind.kind == "b":
            return a.astype(bool)
        return _to_int(a, kind, st.ctx)
