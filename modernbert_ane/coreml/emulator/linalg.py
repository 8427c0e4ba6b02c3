"""Linear algebra: matmul, linear, einsum and conv (float32 accumulation in both modes)."""
import itertools

import numpy as np

from .elementwise import is_float
from .errors import UnsupportedOpError
from .numerics import F32, as_bool, as_int, as_ints, as_str, f32
from .registry import register

@register("matmul")
def _matmul(a, ctx):
    x, y = np.asarray(a["x"]), np.asarray(a["y"])
    if is_float(x, y):
        x, y = f32(x), f32(y)
    if as_bool(a.get("transpose_x")) and x.ndim >= 2:
        x = np.swapaxes(x, -1, -2)
    if as_bool(a.get("transpose_y")) and y.ndim >= 2:
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


@register("linear")
def _linear(a, ctx):
    x = f32(a["x"])
    w = f32(a["weight"])
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


@register("einsum")
def _einsum(a, ctx):
    vals = [f32(v) for v in a["values"]]
    eq = as_str(a["equation"]).replace(" ", "")
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
        p = as_ints(pad) if pad is not None else [0] * (2 * n)
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


@register("conv")
def _conv(a, ctx):
    x = f32(a["x"])
    w = f32(a["weight"])
    nsp = x.ndim - 2
    if nsp < 1 or w.ndim != x.ndim:
        raise UnsupportedOpError(f"{ctx.where()}: conv with input rank {x.ndim} / weight rank {w.ndim}")
    strides = as_ints(a["strides"]) if a.get("strides") is not None else [1] * nsp
    dils = as_ints(a["dilations"]) if a.get("dilations") is not None else [1] * nsp
    groups = as_int(a["groups"]) if a.get("groups") is not None else 1
    pad_type = as_str(a.get("pad_type"), "valid")
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
        y = np.zeros((n, groups, cout_g, int(np.prod(out_sp))), F32)
        for pos in itertools.product(*[range(k) for k in ks]):
            sl = tuple(
                slice(p * d, p * d + (o - 1) * s + 1, s) for p, d, o, s in zip(pos, dils, out_sp, strides)
            )
            xs = x[(slice(None), slice(None)) + sl].reshape(n, groups, cin_g, -1)
            y += np.matmul(wg[(Ellipsis,) + tuple(pos)][None], xs)
        y = y.reshape([n, cout] + out_sp)
    b = a.get("bias")
    if b is not None:
        y = y + np.asarray(b, F32).reshape([1, -1] + [1] * nsp)
    return y
