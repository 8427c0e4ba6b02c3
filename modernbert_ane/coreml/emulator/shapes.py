"""Shape and data-movement ops (reshape, transpose, concat, slices, fill, pad, ...)."""
import numpy as np

from .elementwise import is_float
from .errors import EmulationError, UnsupportedOpError
from .numerics import F32, as_bool, as_int, as_ints, as_str, norm_axes, norm_axis
from .registry import register

@register("reshape")
def _reshape(a, ctx):
    x = np.asarray(a["x"])
    shape = as_ints(a["shape"])
    if 0 in shape:  # 0 copies the matching dim of x, right-aligned (iOS17 rule; same as iOS15 when ranks match)
        xs = list(x.shape)[::-1]
        rs = shape[::-1]
        rs = [(xs[i] if i < len(xs) else 1) if d == 0 else d for i, d in enumerate(rs)]
        shape = rs[::-1]
    return x.reshape(shape)


@register("expand_dims")
def _expand_dims(a, ctx):
    x = np.asarray(a["x"])
    axes = as_ints(a["axes"])
    out_rank = x.ndim + len(axes)
    axes = sorted(ax + out_rank if ax < 0 else ax for ax in axes)
    shape = list(x.shape)
    for ax in axes:
        shape.insert(ax, 1)
    return x.reshape(shape)


@register("squeeze")
def _squeeze(a, ctx):
    x = np.asarray(a["x"])
    if a.get("axes") is None:
        return np.squeeze(x)
    return np.squeeze(x, axis=tuple(norm_axes(a["axes"], x.ndim)))


@register("transpose")
def _transpose(a, ctx):
    return np.transpose(a["x"], as_ints(a["perm"]))


@register("tile")
def _tile(a, ctx):
    return np.tile(a["x"], as_ints(a["reps"]))


@register("concat")
def _concat(a, ctx):
    vals = [np.asarray(v) for v in a["values"]]
    if any(v.ndim == 0 for v in vals):  # MIL concatenates scalars as length-1 vectors
        vals = [np.atleast_1d(v) for v in vals]
    axis = norm_axis(a["axis"], vals[0].ndim)
    if as_bool(a.get("interleave")):
        st = np.stack(vals, axis=axis + 1)
        shape = list(vals[0].shape)
        shape[axis] *= len(vals)
        return st.reshape(shape)
    return np.concatenate(vals, axis=axis)


@register("stack")
def _stack(a, ctx):
    vals = [np.asarray(v) for v in a["values"]]
    return np.stack(vals, axis=norm_axis(a["axis"], vals[0].ndim + 1))


@register("split")
def _split(a, ctx):
    x = np.asarray(a["x"])
    axis = norm_axis(a["axis"], x.ndim)
    dim = x.shape[axis]
    if a.get("split_sizes") is not None:
        sizes = as_ints(a["split_sizes"])
    else:
        n = as_int(a["num_splits"]) if a.get("num_splits") is not None else ctx.n_out
        if dim % n:
            raise EmulationError(f"{ctx.where()}: num_splits {n} does not divide dimension {dim}")
        sizes = [dim // n] * n
    if sum(sizes) != dim:
        raise EmulationError(f"{ctx.where()}: split sizes {sizes} do not add up to {dim}")
    return tuple(np.split(x, np.cumsum(sizes)[:-1], axis=axis))


def _slices(x, begin, end, stride, begin_mask, end_mask, squeeze_mask):
    rank = x.ndim
    begin = as_ints(begin)
    end = as_ints(end)
    stride = as_ints(stride) if stride is not None else [1] * rank
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


@register("slice_by_index")
def _slice_by_index(a, ctx):
    x = np.asarray(a["x"])
    return x[_slices(x, a["begin"], a["end"], a.get("stride"), a.get("begin_mask"), a.get("end_mask"),
                     a.get("squeeze_mask"))]


@register("slice_update")
def _slice_update(a, ctx):
    x = np.array(a["x"], copy=True)
    sl = _slices(x, a["begin"], a["end"], a.get("stride"), a.get("begin_mask"), a.get("end_mask"),
                 a.get("squeeze_mask"))
    x[sl] = a["update"]
    return x


@register("slice_by_size")
def _slice_by_size(a, ctx):
    x = np.asarray(a["x"])
    begin, size = as_ints(a["begin"]), as_ints(a["size"])
    sl = []
    for i in range(x.ndim):
        b = begin[i] + x.shape[i] if begin[i] < 0 else begin[i]
        sl.append(slice(b, None) if size[i] < 0 else slice(b, b + size[i]))
    return x[tuple(sl)]


@register("reverse")
def _reverse(a, ctx):
    x = np.asarray(a["x"])
    axes = range(x.ndim) if a.get("axes") is None else norm_axes(a["axes"], x.ndim)
    return np.flip(x, axis=tuple(axes))


@register("flatten2d")
def _flatten2d(a, ctx):
    x = np.asarray(a["x"])
    axis = norm_axis(a.get("axis") if a.get("axis") is not None else 1, x.ndim)
    return x.reshape(int(np.prod(x.shape[:axis])), int(np.prod(x.shape[axis:])))


@register("reshape_like")
def _reshape_like(a, ctx):
    x = np.asarray(a["x"])
    refs = a["ref_tensors"]
    begins, ends, masks = as_ints(a["begins"]), as_ints(a["ends"]), [bool(m) for m in np.asarray(a["end_masks"]).reshape(-1)]
    shape = []
    for r, b, e, m in zip(refs, begins, ends, masks):
        s = np.shape(r)
        shape.extend(s[b:] if m else s[b:e])
    return x.reshape(shape)


@register("shape")
def _shape(a, ctx):
    return np.asarray(np.shape(a["x"]), np.int32)


@register("range_1d")
def _range_1d(a, ctx):
    start, end, step = np.asarray(a["start"]), np.asarray(a["end"]), np.asarray(a["step"])
    if is_float(start, end, step):
        return np.arange(float(start), float(end), float(step), dtype=F32)
    return np.arange(int(start), int(end), int(step), dtype=np.int32)


@register("fill")
def _fill(a, ctx):
    v = a.get("value")
    v = np.float32(0) if v is None else np.asarray(v)
    return np.full(tuple(as_ints(a["shape"])), v, dtype=v.dtype)


@register("fill_like")
def _fill_like(a, ctx):
    v = a.get("value")
    v = np.float32(0) if v is None else np.asarray(v)
    return np.full(np.shape(a["ref_tensor"]), v, dtype=v.dtype)


@register("band_part")
def _band_part(a, ctx):
    x = np.asarray(a["x"])
    lower = as_int(a["lower"]) if a.get("lower") is not None else -1
    upper = as_int(a["upper"]) if a.get("upper") is not None else -1
    m, n = x.shape[-2], x.shape[-1]
    d = np.arange(m)[:, None] - np.arange(n)[None, :]  # m - n
    keep = np.ones((m, n), bool)
    if lower >= 0:
        keep &= d <= lower
    if upper >= 0:
        keep &= -d <= upper
    return np.where(keep, x, np.zeros((), x.dtype))


@register("topk")
def _topk(a, ctx):
    x = np.asarray(a["x"])
    k = as_int(a["k"]) if a.get("k") is not None else 1
    axis = norm_axis(a.get("axis") if a.get("axis") is not None else -1, x.ndim)
    asc = as_bool(a.get("ascending"))
    key = x if asc else -x.astype(np.float64) if x.dtype.kind != "b" else ~x
    order = np.argsort(key, axis=axis, kind="stable")
    idx = np.take(order, np.arange(k), axis=axis)
    vals = np.take_along_axis(x, idx, axis=axis)
    if ctx.n_out == 1:
        return vals
    return vals, idx.astype(np.int32)


@register("argsort")
def _argsort(a, ctx):
    x = np.asarray(a["x"])
    axis = norm_axis(a.get("axis") if a.get("axis") is not None else -1, x.ndim)
    asc = as_bool(a.get("ascending"))
    key = x if asc else -x.astype(np.float64)
    return np.argsort(key, axis=axis, kind="stable").astype(np.int32)


@register("one_hot")
def _one_hot(a, ctx):
    idx = np.asarray(a["indices"]).astype(np.int64)
    depth = as_int(a["one_hot_vector_size"])
    axis = as_int(a["axis"]) if a.get("axis") is not None else -1
    on = np.asarray(a.get("on_value") if a.get("on_value") is not None else 1)
    off = np.asarray(a.get("off_value") if a.get("off_value") is not None else 0)
    hot = idx[..., None] == np.arange(depth)
    out = np.where(hot, on, off)
    out_rank = idx.ndim + 1
    axis = axis + out_rank if axis < 0 else axis
    return np.moveaxis(out, -1, axis)


@register("pad")
def _pad(a, ctx):
    x = np.asarray(a["x"])
    p = as_ints(a["pad"])
    n = len(p) // 2
    widths = [(0, 0)] * (x.ndim - n) + [(p[2 * i], p[2 * i + 1]) for i in range(n)]
    mode = as_str(a.get("mode"), "constant")
    if mode == "constant":
        cv = a.get("constant_val")
        return np.pad(x, widths, mode="constant", constant_values=0 if cv is None else np.asarray(cv).item())
    if mode == "reflect":
        return np.pad(x, widths, mode="reflect")
    if mode == "replicate":
        return np.pad(x, widths, mode="edge")
    raise UnsupportedOpError(f"{ctx.where()}: pad mode {mode!r} is not supported")


@register("non_zero")
def _non_zero(a, ctx):
    return np.argwhere(np.asarray(a["x"])).astype(np.int32)


@register("sliding_windows")
def _sliding_windows(a, ctx):
    x = np.asarray(a["x"])
    axis = norm_axis(a["axis"], x.ndim)
    size = as_int(a["size"])
    stride = as_int(a["stride"]) if a.get("stride") is not None else 1
    w = np.lib.stride_tricks.sliding_window_view(x, size, axis=axis)  # window dim appended last
    w = np.take(w, np.arange(0, w.shape[axis], stride), axis=axis)
    return np.moveaxis(w, -1, axis + 1)
