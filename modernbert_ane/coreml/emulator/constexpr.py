"""Compile-time weight decompression (constexpr_*), run once when a package is loaded."""
import math

import numpy as np

from .errors import EmulationError
from .numerics import as_int, as_ints, f32
from .registry import register

def _unpack_bits(packed, nbits, count):
    bits = np.unpackbits(np.asarray(packed).astype(np.uint8).reshape(-1), bitorder="little")
    bits = bits[: count * nbits].reshape(count, nbits).astype(np.uint32)
    return (bits << np.arange(nbits, dtype=np.uint32)).sum(axis=1)


def promote_to_rank(param, data, axis):
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


@register("constexpr_affine_dequantize")
def _cx_affine_dequantize(a, ctx):
    q = np.asarray(a["quantized_data"])
    axis = as_int(a["axis"])
    scale = promote_to_rank(a["scale"], q, axis).astype(np.float32)
    zp = promote_to_rank(a["zero_point"], q, axis).astype(np.float32)
    return (q.astype(np.float32) - zp) * scale


@register("constexpr_cast")
def _cx_cast(a, ctx):
    return f32(a["source_val"])


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


@register("constexpr_lut_to_dense")
def _cx_lut_to_dense(a, ctx):
    lut = np.asarray(a["lut"])
    if a.get("shape") is not None:  # iOS16: packed uint8 indices, 1-D lut
        shape = as_ints(a["shape"])
        nbits = int(round(math.log2(lut.size)))
        idx = _unpack_bits(a["indices"], nbits, int(np.prod(shape)))
        return lut[idx].reshape(shape)
    va = a.get("vector_axis")
    return _lut_iOS18(a["indices"], lut, None if va is None else as_int(va))


def _sparse_dense(nonzero, mask):
    mask = np.asarray(mask)
    out = np.zeros(mask.shape, dtype=np.asarray(nonzero).dtype)
    out[mask != 0] = nonzero
    return out


@register("constexpr_sparse_to_dense")
def _cx_sparse_to_dense(a, ctx):
    nz = np.asarray(a["nonzero_data"])
    if a.get("shape") is not None:  # iOS16: bit-packed mask
        shape = as_ints(a["shape"])
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


@register("constexpr_blockwise_shift_scale")
def _cx_blockwise_shift_scale(a, ctx):
    return _shift_scale(a["data"], a["scale"], a.get("offset"))


@register("constexpr_sparse_blockwise_shift_scale")
def _cx_sparse_blockwise_shift_scale(a, ctx):
    mask = np.asarray(a["data_mask"])
    dense = _sparse_dense(a["nonzero_data"], mask)
    deq = _shift_scale(dense, a["scale"], a.get("offset"))
    return mask, deq[mask != 0].reshape(-1)


@register("constexpr_lut_to_sparse")
def _cx_lut_to_sparse(a, ctx):
    mask = np.asarray(a["indices_mask"])
    idx = _sparse_dense(a["indices_nonzero_data"], mask)
    lut = np.asarray(a["lut"])
    va = a.get("vector_axis")
    va = None if va is None else as_int(va)
    dense = _lut_iOS18(idx, lut, va)
    if va is not None and lut.shape[-1] > 1:
        mask = np.repeat(mask, lut.shape[-1], axis=va)
    return mask, dense[mask != 0].reshape(-1)
