"""Softmax, norms, reductions, scaled_dot_product_attention and cumsum: the ops whose internal
steps pessimistic mode rounds to float16."""
import math

import numpy as np

from .elementwise import channel_param
from .numerics import F32, as_bool, count_elements, f16, f32, norm_axis, poison, reduce_axes, sum16
from .registry import OPS, register

def _softmax_core(x, axis, pessimistic):
    x = f32(x)
    m = np.max(x, axis=axis, keepdims=True)
    if not pessimistic:
        e = np.exp(x - m)
        return e / np.sum(e, axis=axis, keepdims=True)
    e = f16(np.exp(f16(x - m)))
    s = sum16(e, [axis % x.ndim], True)
    return e / s


@register("softmax")
def _softmax(a, ctx):
    x = a["x"]
    axis = norm_axis(a.get("axis") if a.get("axis") is not None else -1, np.ndim(x))
    return _softmax_core(x, axis, ctx.pessimistic)


def _gamma_beta(p, x, axes):
    if p is None:
        return None
    shape = [x.shape[i] if i in axes else 1 for i in range(x.ndim)]
    return np.asarray(p, F32).reshape(shape)


def _normalize(x, axes, eps, gamma, beta, pessimistic):
    """(x - mean) / sqrt(var + eps) * gamma + beta over `axes` (layer/instance norm)."""
    n = count_elements(x, axes)
    ax = tuple(axes)
    eps = np.float32(eps)
    if not pessimistic:
        mean = np.mean(x, axis=ax, keepdims=True, dtype=F32)
        zm = x - mean
        var = np.mean(zm * zm, axis=ax, keepdims=True, dtype=F32)
        y = zm * (np.float32(1) / np.sqrt(var + eps))
        if gamma is not None:
            y = y * gamma
        if beta is not None:
            y = y + beta
        return y
    mean = f16(sum16(x, axes, True) / np.float32(n))
    zm = f16(x - mean)
    sq = f16(zm * zm)
    var = f16(sum16(sq, axes, True) / np.float32(n))
    rstd = f16(np.float32(1) / np.sqrt(f16(var + eps)))
    rstd = poison(rstd, ~np.isfinite(var))
    y = f16(zm * rstd)
    if gamma is not None:
        y = f16(y * gamma)
    if beta is not None:
        y = y + beta
    return y


@register("layer_norm")
def _layer_norm(a, ctx):
    x = f32(a["x"])
    axes = reduce_axes(x, a.get("axes"))
    eps = a.get("epsilon")
    eps = 1e-5 if eps is None else eps
    return _normalize(x, axes, eps, _gamma_beta(a.get("gamma"), x, axes), _gamma_beta(a.get("beta"), x, axes),
                      ctx.pessimistic)


@register("instance_norm")
def _instance_norm(a, ctx):
    x = f32(a["x"])
    axes = list(range(2, x.ndim))
    eps = a.get("epsilon")
    eps = 1e-5 if eps is None else eps
    g = None if a.get("gamma") is None else channel_param(a["gamma"], x)
    b = None if a.get("beta") is None else channel_param(a["beta"], x)
    return _normalize(x, axes, eps, g, b, ctx.pessimistic)


@register("batch_norm")
def _batch_norm(a, ctx):
    x = f32(a["x"])
    mean = channel_param(a["mean"], x)
    var = channel_param(a["variance"], x)
    eps = a.get("epsilon")
    eps = np.float32(1e-5 if eps is None else eps)
    g = None if a.get("gamma") is None else channel_param(a["gamma"], x)
    b = None if a.get("beta") is None else channel_param(a["beta"], x)
    if not ctx.pessimistic:
        y = (x - mean) / np.sqrt(var + eps)
        if g is not None:
            y = y * g
        return y if b is None else y + b
    rstd = f16(np.float32(1) / np.sqrt(f16(var + eps)))
    y = f16(f16(x - mean) * rstd)
    if g is not None:
        y = f16(y * g)
    return y if b is None else y + b


@register("l2_norm")
def _l2_norm(a, ctx):
    x = f32(a["x"])
    eps = a.get("epsilon")
    eps = np.float32(1e-6 if eps is None else eps)
    axes = list(range(max(x.ndim - 3, 0), x.ndim))
    if not ctx.pessimistic:
        return x / np.sqrt(np.sum(x * x, axis=tuple(axes), keepdims=True) + eps)
    ss = sum16(f16(x * x), axes, True)
    denom = f16(np.sqrt(f16(ss + eps)))
    return poison(x / denom, ~np.isfinite(ss))


def _keep(a):
    return as_bool(a.get("keep_dims"), False)


def _reduction(kind):
    def run(a, ctx):
        x = np.asarray(a["x"])
        axes = reduce_axes(x, a.get("axes"))
        keep = _keep(a)
        ax = tuple(axes)
        p = ctx.pessimistic and x.dtype.kind == "f"
        if kind == "max":
            return np.max(x, axis=ax, keepdims=keep)
        if kind == "min":
            return np.min(x, axis=ax, keepdims=keep)
        if kind == "prod":
            return np.prod(x, axis=ax, keepdims=keep)
        x = f32(x) if kind != "sum" or x.dtype.kind == "f" else x
        if kind == "sum":
            return sum16(x, axes, keep) if p else np.sum(x, axis=ax, keepdims=keep)
        if kind == "mean":
            n = np.float32(count_elements(x, axes))
            return f16(sum16(x, axes, keep)) / n if p else np.mean(x, axis=ax, keepdims=keep, dtype=F32)
        if kind == "l1_norm":
            return sum16(np.abs(x), axes, keep) if p else np.sum(np.abs(x), axis=ax, keepdims=keep)
        if kind == "sum_square":
            return sum16(f16(x * x), axes, keep) if p else np.sum(x * x, axis=ax, keepdims=keep)
        if kind == "l2_norm":
            if p:
                return np.sqrt(sum16(f16(x * x), axes, keep))
            return np.sqrt(np.sum(x * x, axis=ax, keepdims=keep))
        if kind == "log_sum":
            return np.log(sum16(x, axes, keep) if p else np.sum(x, axis=ax, keepdims=keep))
        if kind == "log_sum_exp":
            m = np.max(x, axis=ax, keepdims=True)
            m = np.where(np.isfinite(m), m, np.float32(0))
            if p:
                s = sum16(f16(np.exp(f16(x - m))), axes, True)
                r = f16(np.log(s)) + m
            else:
                r = np.log(np.sum(np.exp(x - m), axis=ax, keepdims=True)) + m
            return r if keep else np.squeeze(r, axis=ax)
        raise AssertionError(kind)

    return run


for _kind in ("max", "min", "prod", "sum", "mean", "l1_norm", "l2_norm", "sum_square", "log_sum", "log_sum_exp"):
    OPS["reduce_" + _kind] = _reduction(_kind)


def _arg_reduce(fn):
    def run(a, ctx):
        x = np.asarray(a["x"])
        axis = norm_axis(a.get("axis") if a.get("axis") is not None else -1, x.ndim)
        r = fn(x, axis=axis)
        if _keep(a):
            r = np.expand_dims(r, axis)
        return r.astype(np.int32)

    return run


OPS["reduce_argmax"] = _arg_reduce(np.argmax)
OPS["reduce_argmin"] = _arg_reduce(np.argmin)


@register("scaled_dot_product_attention")
def _sdpa(a, ctx):
    q, k, v = f32(a["query"]), f32(a["key"]), f32(a["value"])
    scale = np.float32(1.0 / math.sqrt(q.shape[-1]))
    p = ctx.pessimistic
    s = np.matmul(q, np.swapaxes(k, -1, -2))
    if p:
        s = f16(f16(s) * scale)
    else:
        s = s * scale
    mask = a.get("attn_mask")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.dtype == bool:
            s = np.where(mask, s, np.float32(-np.inf))
        else:
            s = s + f32(mask)
    s = f16(s)  # scores are materialized in float16
    w = f16(_softmax_core(s, s.ndim - 1, p))
    return np.matmul(w, v)


@register("cumsum")
def _cumsum(a, ctx):
    x = np.asarray(a["x"])
    axis = norm_axis(a.get("axis") if a.get("axis") is not None else 0, x.ndim)
    exclusive = as_bool(a.get("exclusive"))
    reverse = as_bool(a.get("reverse"))
    if reverse:
        x = np.flip(x, axis)
    if ctx.pessimistic and x.dtype.kind == "f":
        xm = np.moveaxis(f32(x), axis, 0)
        out = np.empty_like(xm)
        acc = np.zeros(xm.shape[1:], F32)
        for i in range(xm.shape[0]):
            acc = f16(acc + xm[i])
            out[i] = acc
        y = np.moveaxis(out, 0, axis)
    else:
        y = np.cumsum(x, axis=axis, dtype=F32 if x.dtype.kind == "f" else None)
    if exclusive:
        y = np.concatenate([np.zeros_like(np.take(y, [0], axis=axis)), np.take(y, np.arange(y.shape[axis] - 1), axis=axis)], axis=axis)
    if reverse:
        y = np.flip(y, axis)
    return y
