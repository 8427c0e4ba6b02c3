"""gather and scatter ops; out-of-range indices raise EmulationError instead of wrapping."""
import numpy as np

from .errors import EmulationError, UnsupportedOpError
from .numerics import as_int, as_str, norm_axis
from .registry import register

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


@register("gather")
def _gather(a, ctx):
    x = np.asarray(a["x"])
    axis = norm_axis(a.get("axis") if a.get("axis") is not None else 0, x.ndim)
    bd = as_int(a["batch_dims"]) if a.get("batch_dims") is not None else 0
    idx = _check_indices(a["indices"], x.shape[axis], ctx)
    if bd == 0:
        return np.take(x, idx, axis=axis)
    bshape = x.shape[:bd]
    nb = int(np.prod(bshape))
    xr = x.reshape((nb,) + x.shape[bd:])
    ir = idx.reshape((nb,) + idx.shape[bd:])
    res = np.stack([np.take(xr[i], ir[i], axis=axis - bd) for i in range(nb)])
    return res.reshape(tuple(bshape) + res.shape[1:])


@register("gather_along_axis")
def _gather_along_axis(a, ctx):
    x = np.asarray(a["x"])
    axis = norm_axis(a.get("axis") if a.get("axis") is not None else 0, x.ndim)
    idx = _check_indices(a["indices"], x.shape[axis], ctx)
    return np.take_along_axis(x, idx, axis=axis)


@register("gather_nd")
def _gather_nd(a, ctx):
    x = np.asarray(a["x"])
    idx = np.asarray(a["indices"])
    bd = as_int(a["batch_dims"]) if a.get("batch_dims") is not None else 0
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
    mode = as_str(mode, "add")
    if mode == "update":
        data[index] = updates
    elif mode in _SCATTER_UFUNCS:
        _SCATTER_UFUNCS[mode].at(data, index, updates)
    else:
        raise UnsupportedOpError(f"{ctx.where()}: scatter mode {mode!r} is not supported")
    return data


@register("scatter")
def _scatter(a, ctx):
    data = np.array(a["data"], copy=True)
    axis = norm_axis(a.get("axis") if a.get("axis") is not None else 0, data.ndim)
    idx = _check_indices(a["indices"], data.shape[axis], ctx)
    d = np.moveaxis(data, axis, 0)
    u = np.moveaxis(np.asarray(a["updates"], data.dtype), axis, 0)
    _scatter_apply(d, idx, u, a.get("mode"), ctx)
    return data


@register("scatter_along_axis")
def _scatter_along_axis(a, ctx):
    data = np.array(a["data"], copy=True)
    axis = norm_axis(a.get("axis") if a.get("axis") is not None else 0, data.ndim)
    idx = _check_indices(a["indices"], data.shape[axis], ctx)
    idx = np.where(idx < 0, idx + data.shape[axis], idx)
    grid = list(np.indices(idx.shape, sparse=True))
    grid[axis] = idx
    return _scatter_apply(data, tuple(grid), np.asarray(a["updates"], data.dtype), a.get("mode"), ctx)


@register("scatter_nd")
def _scatter_nd(a, ctx):
    data = np.array(a["data"], copy=True)
    idx = np.asarray(a["indices"])
    k = idx.shape[-1]
    cols = tuple(_check_indices(idx[..., j], data.shape[j], ctx) for j in range(k))
    return _scatter_apply(data, cols, np.asarray(a["updates"], data.dtype), a.get("mode"), ctx)
