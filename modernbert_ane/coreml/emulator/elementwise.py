"""Elementwise ops: binary, unary, activations, select and cast."""
import math

import numpy as np
from scipy.special import erf

from .errors import EmulationError, UnsupportedOpError
from .numerics import F32, as_str, f32
from .registry import OPS, register

def _binary(fn):
    def run(a, ctx):
        x, y = np.asarray(a["x"]), np.asarray(a["y"])
        if x.dtype.kind in "iu" and y.dtype.kind in "iu":
            # exact integer arithmetic; narrowing to the declared dtype is range-checked
            x, y = x.astype(np.int64, copy=False), y.astype(np.int64, copy=False)
        return fn(x, y)

    return run


def is_float(*xs):
    return any(np.asarray(x).dtype.kind == "f" for x in xs)


def _real_div(x, y):
    if not is_float(x, y):  # integer real_div: truncating division like C
        return np.trunc(x.astype(np.float64) / y).astype(np.result_type(x, y))
    return np.divide(f32(x), f32(y))


def _pow(x, y):
    if is_float(x, y):
        return np.power(f32(x), f32(y))
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
    OPS[_name] = _binary(_fn)


# ---- elementwise unary ----------------------------------------------------------------

def _unary(fn):
    def run(a, ctx):
        return fn(np.asarray(a["x"]))

    return run


def _fl(fn):
    return lambda x: fn(f32(x))


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
    "erf": _fl(erf),
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
    OPS[_name] = _unary(_fn)


@register("inverse")
def _inverse(a, ctx):
    eps = a.get("epsilon")
    eps = np.float32(1e-4) if eps is None else eps
    return 1.0 / (f32(a["x"]) + eps)


@register("log")
def _log(a, ctx):
    eps = a.get("epsilon")
    eps = np.float32(0) if eps is None else eps
    return np.log(f32(a["x"]) + eps)


@register("rsqrt")
def _rsqrt(a, ctx):
    eps = a.get("epsilon")
    eps = np.float32(0) if eps is None else eps
    return 1.0 / np.sqrt(f32(a["x"]) + eps)


@register("clip")
def _clip(a, ctx):
    return np.minimum(np.maximum(a["x"], a["alpha"]), a["beta"])


@register("threshold")
def _threshold(a, ctx):
    return np.maximum(a["x"], a["alpha"])


@register("thresholded_relu")
def _thresholded_relu(a, ctx):
    x = f32(a["x"])
    return np.where(x >= a["alpha"], x, np.float32(0))


@register("leaky_relu")
def _leaky_relu(a, ctx):
    x = f32(a["x"])
    return np.where(x < 0, x * a["alpha"], x)


@register("elu")
def _elu(a, ctx):
    x = f32(a["x"])
    return np.where(x > 0, x, a["alpha"] * np.expm1(np.minimum(x, 0)))


@register("clamped_relu")
def _clamped_relu(a, ctx):
    x = f32(a["x"])
    return np.minimum(np.maximum(x, 0), a["beta"]) + np.minimum(np.minimum(x, 0) * a["alpha"], a["beta"])


@register("linear_activation")
def _linear_activation(a, ctx):
    return f32(a["x"]) * a["alpha"] + a["beta"]


@register("scaled_tanh")
def _scaled_tanh(a, ctx):
    return a["alpha"] * np.tanh(f32(a["x"]) * a["beta"])


@register("sigmoid_hard")
def _sigmoid_hard(a, ctx):
    return np.minimum(np.maximum(f32(a["x"]) * a["alpha"] + a["beta"], 0), 1)


def channel_param(p, x):
    p = np.asarray(p, F32).reshape(-1)
    return p.reshape([1, -1] + [1] * (np.ndim(x) - 2)) if p.size > 1 else p.reshape(())


@register("prelu")
def _prelu(a, ctx):
    x = f32(a["x"])
    return np.where(x > 0, x, x * channel_param(a["alpha"], x))


@register("softplus_parametric")
def _softplus_parametric(a, ctx):
    x = f32(a["x"])
    return channel_param(a["alpha"], x) * np.logaddexp(np.float32(0), x * channel_param(a["beta"], x))


_SQRT_2_OVER_PI = np.float32(math.sqrt(2.0 / math.pi))
_INV_SQRT2 = np.float32(1.0 / math.sqrt(2.0))


@register("gelu")
def _gelu(a, ctx):
    x = f32(a["x"])
    mode = as_str(a.get("mode"), "EXACT")
    if mode == "EXACT":
        return np.float32(0.5) * x * (np.float32(1) + erf(x * _INV_SQRT2))
    if mode == "TANH_APPROXIMATION":
        inner = _SQRT_2_OVER_PI * (x + np.float32(0.044715) * x * x * x)
        return np.float32(0.5) * x * (np.float32(1) + np.tanh(inner))
    if mode == "SIGMOID_APPROXIMATION":
        return x / (np.float32(1) + np.exp(np.float32(-1.702) * x))
    raise UnsupportedOpError(f"{ctx.where()}: gelu mode {mode!r} is not supported")


@register("select")
def _select(a, ctx):
    return np.where(np.asarray(a["cond"]).astype(bool), a["a"], a["b"])


INT_DTYPES = {
    "int8": np.int8, "uint8": np.uint8, "int16": np.int16, "uint16": np.uint16,
    "int32": np.int32, "uint32": np.uint32, "int64": np.int64,
}


def to_int(x, dtype, ctx):
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


@register("cast")
def _cast(a, ctx):
    dtype = as_str(a["dtype"])
    x = np.asarray(a["x"])
    if dtype in ("fp16", "fp32", "fp64"):
        return f32(x)
    if dtype == "bool":
        return x != 0
    if dtype in INT_DTYPES:
        return to_int(x, INT_DTYPES[dtype], ctx)
    raise UnsupportedOpError(f"{ctx.where()}: cast to {dtype!r} is not supported")
