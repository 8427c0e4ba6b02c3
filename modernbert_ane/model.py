"""ModernBERT, reimplemented in the layout the Apple Neural Engine wants.

Follows Apple's ml-ane-transformers recipe:
- tensors are channels-first `(B, C, 1, S)`: the ANE's native 4D layout, last axis contiguous;
- every linear is a 1x1 `Conv2d`: the op the ANE runs fastest, and no reshapes around it;
- attention is split per head with einsum: avoids rank-5 tensors, which break ANE compilation;
- masks are additive with a finite fill (-1e4): `finfo.min` becomes -inf in float16 and NaN-fills
  fully masked rows;
- norms reduce over the channel axis, in one of three forms (`set_norm`, NORM_KINDS): "fused" (one
  layer_norm op, squares overflow float16 beyond 256), "safe" (divided by max|x| first: nothing squared
  exceeds 4, clamp-free) or "l2eps" (an L2 norm with an epsilon channel).

Numerics otherwise follow transformers' `modernbert` implementation exactly (float32 parity ~1e-6).
"""
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from modernbert_ane.checkpoint import Checkpoint, CheckpointError, load_state_dict, resolve_checkpoint, sentence_modules
from modernbert_ane.tasks import ARCHITECTURE_TASKS, POOLED_TASKS, TASKS

MASK_FILL = -1e4            # float16-safe "minus infinity": exp(-1e4) == 0, and -2e4 (two masks added) is finite
FLOAT16_MAX = 65504.0


# -----------------------------------------------------------------------------
# config

@dataclass
class ModernBertConfig:
    vocab_size: int = 50368
    hidden_size: int = 768
    intermediate_size: int = 1152
    num_hidden_layers: int = 22
    num_attention_heads: int = 12
    hidden_activation: str = "gelu"
    max_position_embeddings: int = 8192
    norm_eps: float = 1e-5
    norm_bias: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    layer_types: tuple = ()              # per layer: "full_attention" (global) or "sliding_attention" (local)
    global_rope_theta: float = 160000.0
    local_rope_theta: float = 10000.0
    local_attention: int = 128           # total window: a local token sees neighbours with |i - j| <= 64
    decoder_bias: bool = True
    classifier_pooling: str = "cls"
    classifier_bias: bool = False
    classifier_activation: str = "gelu"
    num_labels: int = 2
    architectures: tuple = ()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def window_radius(self) -> int:
        return self.local_attention // 2

    @classmethod
    def from_dict(cls, d: dict) -> "ModernBertConfig":
        """Read a checkpoint's config.json, in either format transformers has written."""
        if d.get("model_type") != "modernbert":
            raise CheckpointError(f"config describes a '{d.get('model_type')}' model; only 'modernbert' is supported")
        known = {f.name for f in fields(cls)} - {"layer_types", "global_rope_theta", "local_rope_theta",
                                                 "architectures", "num_labels"}
        kw = {k: d[k] for k in known if d.get(k) is not None}
        n = int(d.get("num_hidden_layers", cls.num_hidden_layers))
        if d.get("layer_types"):             # recent transformers: the attention kind of every layer
            layer_types = tuple(d["layer_types"])
        else:                                # released checkpoints: every n-th layer (layer 0 included) is global
            every = int(d.get("global_attn_every_n_layers", 3))
            layer_types = tuple("sliding_attention" if i % every else "full_attention" for i in range(n))
        bad = set(layer_types) - {"full_attention", "sliding_attention"}
        if len(layer_types) != n or bad:
            raise CheckpointError(f"config layer_types must name {n} layers as full_attention/sliding_attention")
        kw["layer_types"] = layer_types
        rope = d.get("rope_parameters") or {}
        for kind, key in (("full_attention", "global_rope_theta"), ("sliding_attention", "local_rope_theta")):
            params = rope.get(kind) or {}
            if params.get("rope_type", "default") != "default" or d.get("rope_scaling"):
                raise CheckpointError(f"rope scaling ({params.get('rope_type') or d.get('rope_scaling')}) "
                                      f"is not supported")
            theta = params.get("rope_theta", d.get(key))
            if theta is not None:
                kw[key] = float(theta)
        kw["architectures"] = tuple(d.get("architectures") or ())
        if d.get("id2label"):
            kw["num_labels"] = len(d["id2label"])
        elif d.get("num_labels"):
            kw["num_labels"] = int(d["num_labels"])
        config = cls(**kw)
        if config.hidden_size % config.num_attention_heads or config.head_dim % 2:
            raise CheckpointError(f"hidden_size {config.hidden_size} does not split into "
                                  f"{config.num_attention_heads} heads of even size")
        for act in (config.hidden_activation, config.classifier_activation):
            if act not in ACTIVATIONS:
                raise CheckpointError(f"activation '{act}' is not supported (supported: {', '.join(ACTIVATIONS)})")
        if config.classifier_pooling not in ("cls", "mean"):
            raise CheckpointError(f"classifier_pooling '{config.classifier_pooling}' is not cls or mean")
        return config


ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),                                   # exact (erf) GELU, transformers' "gelu"
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
    "relu": F.relu,
}


# -----------------------------------------------------------------------------
# activation probe: what the float16 diagnostics see of every intermediate tensor

class ActivationProbe:
    """Records, per named intermediate, the largest absolute value and the count of values that
    overflow float16 (non-finite, or beyond 65504). Use as a context manager around a forward pass.
    Inactive (and invisible to tracing) otherwise."""
    active = None

    def __init__(self):
        self.max_abs: dict[str, float] = {}
        self.overflow: dict[str, int] = {}

    def record(self, name: str, x: torch.Tensor) -> None:
        a = x.detach().abs()
        big = int((~(a <= FLOAT16_MAX)).sum())                 # one pass: inf, NaN and beyond 65504 all fail it
        peak = float(a.max()) if big == 0 else float("inf")
        self.max_abs[name] = max(self.max_abs.get(name, 0.0), peak)
        self.overflow[name] = self.overflow.get(name, 0) + big

    @property
    def overflow_count(self) -> int:
        return sum(self.overflow.values())

    @property
    def first_overflow(self) -> str | None:
        return next((name for name, n in self.overflow.items() if n), None)   # dicts keep execution order

    def __enter__(self):
        ActivationProbe.active = self
        return self

    def __exit__(self, *exc):
        ActivationProbe.active = None


def probe(name: str, x: torch.Tensor) -> torch.Tensor:
    if ActivationProbe.active is not None and not torch.jit.is_tracing():
        ActivationProbe.active.record(name, x)
    return x


# -----------------------------------------------------------------------------
# modules

class Conv(nn.Conv2d):
    """nn.Conv2d whose float16 forward (model.py's float16 measurements: `--rotation auto`, `diff_torch.py
    --precision float16`) multiplies in float32 and rounds the result once to float16, as the emulator models
    Core ML's float16 conv. Measured on the trained reference (bench/bench_conv_precision.py): closer to the
    emulator than torch's float16 product, and 12x faster (torch has no fast float16 GEMM on CPU). In float32,
    what is traced and converted, it is nn.Conv2d exactly (the same graph)."""

    def forward(self, x):
        if x.dtype != torch.float16:
            return super().forward(x)
        bias = None if self.bias is None else self.bias.float()
        return self._conv_forward(x.float(), self.weight.float(), bias).half()


def conv1x1(c_in: int, c_out: int, bias: bool) -> nn.Conv2d:
    return Conv(c_in, c_out, kernel_size=1, bias=bias)        # ANE: a linear as a 1x1 conv on (B, C, 1, S)


NORM_KINDS = ("fused", "safe", "l2eps")
SAFE_TINY = 1e-3      # added to max|x| instead of a clamp: a clamp inside a norm hit a Neural Engine bug in a peer port


def probing() -> bool:
    """True while an ActivationProbe records (never while tracing): side computations for it only."""
    return ActivationProbe.active is not None and not torch.jit.is_tracing()


def max_scale(x):
    """max|x| over channels plus a tiny constant, (B, 1, 1, S): what a safe norm divides by first (no
    factor: any multiple of a max beyond 32752 would overflow float16 itself). Clamp-free: the constant
    keeps it > 0 (a zero token gives 0) and eps / m^2 <= 10 finite."""
    return x.abs().amax(dim=1, keepdim=True) + SAFE_TINY


def scaled_rms(x, xs, m, eps: float, name: str):
    """x / sqrt(mean(x^2) + eps), its statistics taken from xs = x / m with |xs| <= 2 (1 for the RMSNorm, 2
    for the LayerNorm's centred values): every square <= 4 in float16. Exact in real arithmetic:
    x / sqrt(mean(x^2) + eps) == x * (rsqrt(mean(xs^2) + eps / m^2) / m) for any m > 0. The
    output multiplies x itself by that per-token scale, not xs: beside a massive value m the small components
    of xs are float16 subnormals (|x| / 3e4 < 6.1e-5) with a few bits left."""
    square = probe(f"{name}.square", xs * xs)                                    # (B, C, 1, S), <= 4
    eps_scaled = eps / m / m                                                     # two divisions: m*m could overflow
    scale = torch.rsqrt(square.mean(dim=1, keepdim=True) + eps_scaled) / m      # (B, 1, 1, S)
    return x * scale                                                             # (B, C, 1, S)


def l2_eps_rms(x, eps: float, name: str):
    """x / ||[x, sqrt(C eps)]|| * sqrt(C) == x / sqrt(mean(x^2) + eps): an L2 norm with the epsilon as an extra
    channel (a peer port's form, reported to survive on the Neural Engine; coremltools emits reduce_l2_norm).
    Nothing is pre-scaled: the sum of squares inside reduce_l2_norm exceeds 65504 once |x| reaches
    ~256 / sqrt(C / 768); the probe records that sum so float16 diagnostics count it as the emulator's
    pessimistic mode does."""
    C = x.shape[1]
    if probing():
        probe(f"{name}.sum_square", (x.float() * x.float()).sum(dim=1, keepdim=True))
    eps_channel = torch.zeros_like(x[:, :1]) + (C * eps) ** 0.5                   # (B, 1, 1, S)
    norm = torch.linalg.vector_norm(torch.cat([x, eps_channel], dim=1), dim=1, keepdim=True)   # (B, 1, 1, S)
    return x * (C ** 0.5 / norm)                                                 # (B, C, 1, S)


class LayerNorm(nn.Module):
    """LayerNorm over the channel axis of (B, C, 1, S), in one of three forms (`kind`, NORM_KINDS):

    - "fused" (transformers' arithmetic): mean, centre, mean of squares; coremltools fuses it into one
      layer_norm op. Its squares overflow float16 once a centred value exceeds 256 (massive activations);
    - "safe": divided by max|x| before centring, so every centred value is <= 2 and every square <= 4
      (see scaled_rms); also the mean's sum stays <= C (several 3e4 channels would overflow it). Not
      2 max|x|: beyond 32752 that scale itself overflows float16 (a trained model's 3.4e4 did);
    - "l2eps": centred, then the L2 norm with an epsilon channel (see l2_eps_rms).
    All three compute the same function in real arithmetic."""

    def __init__(self, channels: int, eps: float, bias: bool, name: str = "", kind: str = "fused"):
        super().__init__()
        self.eps, self.name, self.kind = eps, name, kind
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None

    def forward(self, x):
        if self.kind == "safe":
            # deviation from transformers: divided by m = max|x| before the mean, exact in real arithmetic
            m = probe(f"{self.name}.scale", max_scale(x))                          # (B, 1, 1, S), <= 65504
            xs = x / m                                                             # (B, C, 1, S), |xs| <= 1
            mean = xs.mean(dim=1, keepdim=True)                                    # (B, 1, 1, S), its sum <= C
            out = scaled_rms(x - mean * m, xs - mean, m, self.eps, self.name)      # centred: |xs - mean| <= 2
        elif self.kind == "l2eps":
            out = l2_eps_rms(x - x.mean(dim=1, keepdim=True), self.eps, self.name)
        else:
            # written as mean / centre / mean of squares so coremltools fuses it into one layer_norm op
            zm = x - x.mean(dim=1, keepdim=True)                                  # (B, C, 1, S)
            square = probe(f"{self.name}.square", zm * zm)                         # float16 overflows here first
            out = zm * torch.rsqrt(square.mean(dim=1, keepdim=True) + self.eps)   # (B, C, 1, S)
        out = out * self.weight.view(1, -1, 1, 1)
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        return probe(self.name, out)


class RMSNorm(nn.Module):
    """Weightless RMSNorm over the channel axis (what every LayerNorm becomes once `rotations/` has folded
    the norm weights into the next conv and centred the residual stream): x / rms(x).

    kind "safe" (default): divided by max|x| first, every square <= 1 (scaled_rms), clamp-free;
    "l2eps": the L2 norm with an epsilon channel (l2_eps_rms); "fused": the plain mean of squares
    (overflows float16 once |x| > 256; for measurements only).
    """

    def __init__(self, eps: float, name: str = "", kind: str = "safe"):
        super().__init__()
        self.eps, self.name, self.kind = eps, name, kind

    def forward(self, x):
        if self.kind == "l2eps":
            out = l2_eps_rms(x, self.eps, self.name)
        elif self.kind == "fused":
            square = probe(f"{self.name}.square", x * x)
            out = x * torch.rsqrt(square.mean(dim=1, keepdim=True) + self.eps)    # (B, C, 1, S)
        else:
            m = max_scale(x)                                                       # (B, 1, 1, S)
            out = scaled_rms(x, x / m, m, self.eps, self.name)                     # deviation: exact, see scaled_rms
        return probe(self.name, out)


def rope_tables(theta: float, head_dim: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of RoPE per position, (L, D), in transformers' layout (frequencies repeated over both
    halves). Precomputed in float32: angles up to 8192 rad have no precision left in float16."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.arange(length, dtype=torch.float32)[:, None] * inv_freq[None, :]   # (L, D/2)
    angles = torch.cat([angles, angles], dim=1)                                       # (L, D)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int) -> torch.Tensor:
    B, C, _, S = x.shape
    x = x.reshape(B, heads, C // heads, S)            # (B, H, D, S): rank 4, so no rank-5 views on the ANE
    half = C // heads // 2
    rotated = torch.cat([-x[:, :, half:], x[:, :, :half]], dim=2)   # transformers' rotate_half, per head
    return (x * cos + rotated * sin).reshape(B, C, 1, S)            # (B, C, 1, S)


class Attention(nn.Module):
    def __init__(self, config: ModernBertConfig, layer: int):
        super().__init__()
        C = config.hidden_size
        self.heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.is_global = config.layer_types[layer] == "full_attention"
        self.Wqkv = conv1x1(C, 3 * C, config.attention_bias)
        self.Wo = conv1x1(C, C, config.attention_bias)
        self.query_chunk = None       # set to an int to bound the (S, 1, chunk) score tensors
        self.block = None             # local layers: set to the window radius to attend blockwise, O(S * window)
        self.name = f"layers.{layer}.attn"

    def forward(self, x, cos, sin, mask_bias):
        B, C, _, S = x.shape
        qkv = self.Wqkv(x)                                                     # (B, 3C, 1, S)
        q, k, v = qkv.split(C, dim=1)                                          # 3 x (B, C, 1, S)
        q = apply_rope(q * self.head_dim ** -0.5, cos, sin, self.heads)        # scale q first: smaller float16 scores
        k = apply_rope(k, cos, sin, self.heads)
        if self.block:
            return self.Wo(self.blockwise(q, k, v, mask_bias))                 # (B, C, 1, S)
        chunk = self.query_chunk or S
        kt = k.transpose(1, 3)                                                 # (B, S, 1, C): one transpose per layer
        outs = []
        for h in range(self.heads):                                            # ANE: one einsum pair per head
            sl = slice(h * self.head_dim, (h + 1) * self.head_dim)
            kh = kt[..., sl]                                                   # (B, S, 1, D): a slice, not a transpose
            vh = v[:, sl]                                                      # (B, D, 1, S)
            parts = []
            for s in range(0, S, chunk):
                qh = q[:, sl, :, s:s + chunk]                                  # (B, D, 1, Sq)
                scores = torch.einsum("bchq,bkhc->bkhq", qh, kh)               # (B, S, 1, Sq): keys on the channel axis
                bias = mask_bias if mask_bias.shape[3] == 1 else mask_bias[..., s:s + chunk]   # global: (B, S, 1, 1)
                w = (scores + bias).softmax(dim=1)                             # (B, S, 1, Sq)
                parts.append(torch.einsum("bkhq,bchk->bchq", w, vh))           # (B, D, 1, Sq)
            outs.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=3))
        return self.Wo(torch.cat(outs, dim=1))                                 # (B, C, 1, S)


    def blockwise(self, q, k, v, mask_bias):
        """Local attention without an S x S tensor: queries in blocks of b = window radius, each block
        attending to its own and its two neighbouring key blocks (3b keys cover |i - j| <= b).
        mask_bias is in the same block layout: (B, nb, b, 3b). Rank-4 matmuls: coremltools' einsum
        does not take this blocked form."""
        B, C, _, S = q.shape
        b = self.block
        # op count: q, k and v permuted once per layer, each head a channel slice of them (not 3 transposes a head)
        qb = q.reshape(B, C, S // b, b).permute(0, 2, 3, 1)                    # (B, nb, b, C): blocks on the H axis
        kb = neighbour_blocks(k, b).permute(0, 2, 1, 3)                        # (B, nb, C, 3b)
        vb = neighbour_blocks(v, b).permute(0, 2, 3, 1)                        # (B, nb, 3b, C)
        outs = []
        for h in range(self.heads):
            sl = slice(h * self.head_dim, (h + 1) * self.head_dim)
            scores = qb[..., sl] @ kb[:, :, sl]                                # (B, nb, b, 3b)
            w = (scores + mask_bias).softmax(dim=3)
            outs.append(w @ vb[..., sl])                                       # (B, nb, b, D)
        # op count: the heads joined first, then one transpose for the layer, not one per head
        return torch.cat(outs, dim=3).permute(0, 3, 1, 2).reshape(B, C, 1, S)  # (B, nb, b, C) -> (B, C, 1, S)


def local_attention_bytes(form: str, length: int, hidden: int, heads: int, radius: int) -> int:
    """Bytes (float16) the attention core of one sliding-window layer writes at `length` tokens, from the
    roped q, k, v to the heads' concat: an estimate counted by hand from the ops Attention emits in each
    form (S = length, C = hidden, H = heads, b = radius; bench/bench_attention_forms.py sets it beside
    package_cost's count of saved packages):
    - "masked": per head three S x S tensors (scores, masked scores, softmax); 6 C x S besides (K transposed,
      the heads' q, k, v slices and outputs, their concat);
    - "blockwise": per head three (S/b, b, 3b) tensors, 9 b S in all; 35 C x S + 8 C b besides (q in blocks, k
      and v padded, reshaped, sliced into 3 neighbour blocks and joined, three permutes, the heads' slices
      of 3b keys, their outputs, concat, permute and reshape back).
    What convert.py's `--local-attention auto` compares: at base size (768 wide, 12 heads, window 128) the
    S x S form writes less up to 768 tokens, blockwise from 832 (6.5 windows)."""
    S, C, H, b = length, hidden, heads, radius
    if form == "masked":
        return 2 * (3 * H * S * S + 6 * C * S)
    if form == "blockwise":
        return 2 * (9 * H * b * S + 35 * C * S + 8 * C * b)
    raise ValueError(f"unknown local attention '{form}' (masked or blockwise)")


def neighbour_blocks(x, b: int):
    """(B, C, 1, S) -> (B, C, S/b, 3b): for each block of b positions, the previous, own and next block
    (zeros beyond the ends, masked out by the block mask)."""
    B, C, _, S = x.shape
    x = F.pad(x, (b, b)).reshape(B, C, S // b + 2, b)                          # (B, C, nb + 2, b)
    return torch.cat([x[:, :, :-2], x[:, :, 1:-1], x[:, :, 2:]], dim=3)       # (B, C, nb, 3b)


class MLP(nn.Module):
    def __init__(self, config: ModernBertConfig):
        super().__init__()
        self.inner = config.intermediate_size
        self.Wi = conv1x1(config.hidden_size, 2 * self.inner, config.mlp_bias)
        self.act = ACTIVATIONS[config.hidden_activation]
        self.Wo = conv1x1(self.inner, config.hidden_size, config.mlp_bias)
        self.rotation = None          # set by rotations/online.py: H before Wo (Wo holds Wo H^T), a 1x1 conv

    def forward(self, x):
        inp, gate = self.Wi(x).split(self.inner, dim=1)                        # 2 x (B, I, 1, S)
        h = self.act(inp) * gate                                               # (B, I, 1, S)
        if self.rotation is not None:
            h = self.rotation(h)      # ANE: the online rotation as a (grouped) 1x1 conv, channels-first, no reshape
        return self.Wo(h)                                                      # (B, C, 1, S)


class Block(nn.Module):
    def __init__(self, config: ModernBertConfig, layer: int):
        super().__init__()
        C, eps, bias = config.hidden_size, config.norm_eps, config.norm_bias
        # ModernBERT quirk: layer 0 reads the embedding norm's output directly
        self.attn_norm = nn.Identity() if layer == 0 else LayerNorm(C, eps, bias, f"layers.{layer}.attn_norm")
        self.attn = Attention(config, layer)
        self.mlp_norm = LayerNorm(C, eps, bias, f"layers.{layer}.mlp_norm")
        self.mlp = MLP(config)
        self.name = f"layers.{layer}"

    def forward(self, x, cos, sin, mask_bias, attn_input=None):
        """attn_input: what layer 0's attention reads instead of x (see Embeddings.forward)."""
        x = x + self.attn(self.attn_norm(x if attn_input is None else attn_input), cos, sin, mask_bias)   # (B, C, 1, S)
        x = probe(f"{self.name}.attn_residual", x)
        x = x + self.mlp(self.mlp_norm(x))                                          # (B, C, 1, S)
        return probe(self.name, x)


class Embeddings(nn.Module):
    def __init__(self, config: ModernBertConfig):
        super().__init__()
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.norm = LayerNorm(config.hidden_size, config.norm_eps, config.norm_bias, "embeddings.norm")
        self.proj = None              # set by rotations/: the norm's weight, centring and rotation, as a conv

    def forward(self, input_ids, table=None):
        """(layer 0's attention input, the residual stream), both (B, C, 1, S). The same tensor unless
        rotated: then layer 0 reads the normalized embedding, the stream its rotated projection.
        table: the (V, C, 1, 1) table to look tokens up in, when it is the tied decoder's conv weight
        (ModernBert.tied_decoder): the package then stores one V x C constant, read by the gather and the conv."""
        B, S = input_ids.shape
        if table is None:      # the decoder conv's layout in every task: a multi-function package shares the table
            table = self.tok_embeddings.weight[:, :, None, None]                   # (V, C, 1, 1)
        e = table.index_select(0, input_ids.reshape(-1))                           # (B*S, C, 1, 1): rank 4, not 5
        h = self.norm(e.reshape(B, S, -1, 1).permute(0, 2, 3, 1))                  # (B, C, 1, S)
        x = h if self.proj is None else self.proj(h)                                # (B, C, 1, S)
        return h, probe("embeddings", x)


class PredictionHead(nn.Module):
    """transformers' ModernBertPredictionHead: dense, activation, norm."""

    def __init__(self, config: ModernBertConfig):
        super().__init__()
        self.dense = conv1x1(config.hidden_size, config.hidden_size, config.classifier_bias)
        self.act = ACTIVATIONS[config.classifier_activation]
        self.norm = LayerNorm(config.hidden_size, config.norm_eps, config.norm_bias, "head.norm")

    def forward(self, x):
        return self.norm(self.act(self.dense(x)))                             # (B, C, 1, S)


class SentenceHead(nn.Module):
    """The sentence-embedding head of a sentence-transformers folder (or of a plain checkpoint):
    pooling, optional Dense layers with their activations, optional L2 normalization."""

    def __init__(self, pooling: str, dense: list[tuple[int, int, bool, str]] = (), normalize: bool = False):
        super().__init__()
        self.pooling, self.normalize = pooling, normalize
        self.dense = nn.ModuleList(conv1x1(i, o, bias) for i, o, bias, _ in dense)
        self.dense_activations = [act for *_, act in dense]

    def forward(self, pooled):                                                 # (B, C, 1, K)
        x = pooled
        for conv, act in zip(self.dense, self.dense_activations):
            x = DENSE_ACTIVATIONS[act](conv(x))                                # (B, D, 1, K)
        return l2_normalize(x) if self.normalize else x


DENSE_ACTIVATIONS = {"Identity": lambda x: x, "Tanh": torch.tanh, "ReLU": F.relu, "GELU": F.gelu,
                     "Sigmoid": torch.sigmoid}


def l2_normalize(x):
    """x / ||x|| over channels, float16-safe: scaled by max|x| first so the sum of squares stays <= C."""
    m = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-4)                     # (B, 1, 1, K)
    y = x / m
    return y * torch.rsqrt((y * y).sum(dim=1, keepdim=True))                  # (B, D, 1, K)


class ModernBert(nn.Module):
    """The encoder and one task head. forward(input_ids (B, S), attention_mask (B, S)) returns
    fill-mask: logits (B, S, V); encoder: hidden_states (B, S, C); token-classify: logits (B, S, L);
    classify: logits (B, K, L); embed: embeddings (B, K, D), with K = max_texts.

    attention_mask: 1 for a token, 0 for padding. With max_texts K > 1 it carries segment ids
    instead (1..K: which packed text a token belongs to, texts contiguous and in order): positions
    restart per text, attention is block-diagonal, pooled tasks return one row per text."""

    def __init__(self, config: ModernBertConfig, task: str = "fill-mask", max_texts: int = 1,
                 sentence_head: SentenceHead | None = None):
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"unknown task '{task}' (one of {', '.join(TASKS)})")
        self.config, self.task, self.max_texts = config, task, max_texts
        C = config.hidden_size
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.final_norm = LayerNorm(C, config.norm_eps, config.norm_bias, "final_norm")
        self.final_proj = None        # set by rotations/: the final norm's weight and the rotation back, as a conv
        self.rotation = None          # set by rotations/: description of the folded rotation (kind, seed, matrix)
        self.mlp_rotation = None      # set by rotations/online.py: the MLPs' online rotation (kind, block, seed)
        self.float16_inputs = None    # set by convert.py under --compress w8a8: the conv inputs left float16
        if task in ("fill-mask", "classify", "token-classify"):
            self.head = PredictionHead(config)
        if task == "fill-mask":
            self.decoder = conv1x1(C, config.vocab_size, config.decoder_bias)
        elif task in ("classify", "token-classify"):
            self.classifier = conv1x1(C, config.num_labels, True)
        elif task == "embed":
            self.sentence_head = sentence_head or SentenceHead(config.classifier_pooling)
        for theta, kind in ((config.global_rope_theta, "global"), (config.local_rope_theta, "local")):
            cos, sin = rope_tables(theta, config.head_dim, config.max_position_embeddings)
            self.register_buffer(f"{kind}_cos", cos, persistent=False)        # (L, D)
            self.register_buffer(f"{kind}_sin", sin, persistent=False)

    @property
    def tied_decoder(self) -> bool:
        """Whether the decoder's weight is the token-embedding table (transformers ties them; rotations/ leave
        both in the original basis; compression rounds their rows alike): then the embeddings gather from the
        decoder's (V, C, 1, 1) conv weight and the package stores the table once. The decoder stays a 1x1 conv
        (the ANE's fastest op, channels-first logits) rather than a matmul on the (V, C) table, which would
        drop the conv for an op it runs less well; the gather reads the rank-4 table with flattened ids, so
        nothing is rank 5."""
        return self.task == "fill-mask" and torch.equal(self.decoder.weight[:, :, 0, 0],
                                                        self.embeddings.tok_embeddings.weight)

    @property
    def pooling(self) -> str:
        return self.sentence_head.pooling if self.task == "embed" else self.config.classifier_pooling

    def set_norm(self, kind: str) -> None:
        """Every norm (LayerNorm, and the RMSNorms a rotation made) in form `kind` (NORM_KINDS); same function."""
        if kind not in NORM_KINDS:
            raise ValueError(f"unknown norm '{kind}' (one of {', '.join(NORM_KINDS)})")
        for module in self.modules():
            if isinstance(module, (LayerNorm, RMSNorm)):
                module.kind = kind

    def set_query_chunk(self, chunk: int | None) -> None:
        """Process global attention in query chunks of this size: scores stay (S, 1, chunk) per head."""
        for block in self.layers:
            block.attn.query_chunk = chunk if block.attn.is_global else None

    def set_local_attention(self, kind: str) -> None:
        """"masked": local layers use the global layout with an (S, S) window mask; "blockwise": they attend
        in blocks of the window radius, O(S * window) memory and work (sequence lengths must be multiples of it)."""
        if kind not in ("masked", "blockwise"):
            raise ValueError(f"unknown local attention '{kind}' (masked or blockwise)")
        for block in self.layers:
            block.attn.block = self.config.window_radius if kind == "blockwise" and not block.attn.is_global else None

    @property
    def blockwise(self) -> bool:
        return any(block.attn.block for block in self.layers)

    def segments(self, attention_mask):
        """One-hot text membership (B, K, S) int32 and each token's position within its text (B, S).
        Integer arithmetic: counts and positions up to 8192 are not exact in float16."""
        seg = attention_mask.to(torch.int32)                                    # (B, S)
        ids = torch.arange(1, self.max_texts + 1, dtype=torch.int32, device=seg.device)
        onehot = (seg[:, None, :] == ids[None, :, None]).to(torch.int32)       # (B, K, S)
        counts = onehot.sum(dim=2)                                             # (B, K)
        starts = torch.cumsum(counts, dim=1) - counts                          # (B, K): first index of each text
        first = (onehot * starts[:, :, None]).sum(dim=1)                       # (B, S): its text's first index
        positions = torch.arange(seg.shape[1], dtype=torch.int32, device=seg.device)[None, :] - first
        return onehot, positions

    def mask_biases(self, attention_mask, dtype):
        """Additive masks built in the graph from the (B, S) mask: keys on axis 1, queries on axis 3."""
        S = attention_mask.shape[1]
        if self.max_texts == 1:
            keep = (attention_mask == 1).to(dtype)[:, :, None, None]           # (B, S, 1, 1): broadcasts over queries
        else:                                                                  # a text sees its own tokens only
            seg = attention_mask.to(torch.int32)
            same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0)   # (B, S_k, S_q)
            keep = same.to(dtype)[:, :, None, :]                               # (B, S, 1, S)
        global_bias = (1.0 - keep) * MASK_FILL
        if self.blockwise:
            return global_bias, self.block_mask_bias(attention_mask, dtype)
        pos = torch.arange(S, device=attention_mask.device)                    # built from S: right at every length
        far = (pos[:, None] - pos[None, :]).abs() > self.config.window_radius  # (S, S); within a text |i-j| = |p_i-p_j|
        local_bias = global_bias + (far.to(dtype) * MASK_FILL)[None, :, None, :]   # (B, S, 1, S)
        return global_bias, local_bias

    def block_mask_bias(self, attention_mask, dtype):
        """The local mask in blockwise layout (B, nb, b, 3b), b = window radius: key j of a query block's
        3b neighbours sits at offset j - b - i from query i; padding, other texts and |offset| > b are masked."""
        B, S = attention_mask.shape
        b = self.config.window_radius
        if S % b:
            raise ValueError(f"blockwise local attention needs a length that is a multiple of {b}, not {S}")
        seg = attention_mask.to(dtype) if self.max_texts > 1 else (attention_mask == 1).to(dtype)   # (B, S)
        keys = neighbour_blocks(seg[:, None, None, :], b)[:, 0, :, None, :]                      # (B, nb, 1, 3b)
        queries = seg.reshape(B, S // b, b, 1)                                                   # (B, nb, b, 1)
        keep = (keys > 0).to(dtype) if self.max_texts == 1 else ((keys == queries) & (keys > 0)).to(dtype)
        j = torch.arange(3 * b, device=attention_mask.device)[None, :]
        i = torch.arange(b, device=attention_mask.device)[:, None]
        far = ((j - b - i).abs() > b).to(dtype)[None, None]                   # (1, 1, b, 3b): constant
        return (1.0 - keep) * MASK_FILL + far * MASK_FILL                      # (B, nb, b, 3b)

    def rope(self, kind: str, positions, S: int, dtype):
        cos, sin = getattr(self, f"{kind}_cos"), getattr(self, f"{kind}_sin")   # (L, D)
        if positions is None:                                                  # unpacked: positions 0..S-1, a slice
            return cos[:S].t()[None, None].to(dtype), sin[:S].t()[None, None].to(dtype)   # (1, 1, D, S)
        return (F.embedding(positions.long(), cos).transpose(1, 2)[:, None].to(dtype),    # (B, 1, D, S)
                F.embedding(positions.long(), sin).transpose(1, 2)[:, None].to(dtype))

    def encode(self, input_ids, attention_mask, positions=None):
        """The encoder's output (B, C, 1, S), transformers' last hidden state (rotated models undo their
        rotation in final_proj)."""
        S = input_ids.shape[1]
        h, x = self.embeddings(input_ids, self.decoder.weight if self.tied_decoder else None)   # 2 x (B, C, 1, S)
        global_bias, local_bias = self.mask_biases(attention_mask, x.dtype)
        rope = {kind: self.rope(kind, positions, S, x.dtype) for kind in ("global", "local")}
        for i, block in enumerate(self.layers):
            kind = "global" if block.attn.is_global else "local"
            x = block(x, *rope[kind], global_bias if kind == "global" else local_bias, h if i == 0 else None)
        x = self.final_norm(x)                                                 # (B, C, 1, S)
        if self.final_proj is not None:
            x = self.final_proj(x)
        return x

    def forward(self, input_ids, attention_mask):
        onehot, positions = self.segments(attention_mask) if (self.max_texts > 1 or self.task in POOLED_TASKS) \
            else (None, None)
        x = self.encode(input_ids, attention_mask, positions if self.max_texts > 1 else None)   # (B, C, 1, S)
        if self.task in POOLED_TASKS:
            x = self.pool(x, onehot, positions)                                # (B, C, 1, K)
        if self.task == "encoder":
            return x.squeeze(2).transpose(1, 2)                                # (B, S, C)
        if self.task == "embed":
            return self.sentence_head(x).squeeze(2).transpose(1, 2)            # (B, K, D)
        x = self.head(x)
        x = self.decoder(x) if self.task == "fill-mask" else self.classifier(x)   # (B, V or L, 1, S or K)
        return probe("logits", x).squeeze(2).transpose(1, 2)                  # (B, S or K, V or L)

    def pool(self, x, onehot, positions):
        """One vector per text: its first token ([CLS]) or the mean over its tokens. (B, C, 1, K)"""
        if self.pooling == "cls":
            weights = onehot * (positions == 0).to(torch.int32)[:, None, :]   # (B, K, S)
            weights = weights.to(x.dtype)
        elif self.pooling == "mean":
            counts = onehot.sum(dim=2, keepdim=True).clamp(min=1)              # (B, K, 1), int32
            weights = onehot.to(x.dtype) / counts.to(x.dtype)                  # 1/n first: the sum stays <= max|x|
        else:
            raise ValueError(f"unknown pooling '{self.pooling}'")
        return torch.einsum("bcs,bks->bck", x.squeeze(2), weights)[:, :, None, :]   # (B, C, 1, K)

    @classmethod
    def from_pretrained(cls, name_or_path: str, task: str | None = None, revision: str | None = None,
                        max_texts: int = 1, allow_pickle: bool = False):
        """Load a hub id or local folder; returns (model, checkpoint). Fails loudly on any key mismatch."""
        ckpt = resolve_checkpoint(name_or_path, revision, allow_pickle)
        return cls.from_checkpoint(ckpt, task, max_texts), ckpt

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, task: str | None = None, max_texts: int = 1):
        config = ModernBertConfig.from_dict(ckpt.config)
        task = task or ("embed" if ckpt.is_sentence_transformers else default_task(config))
        if task == "embed":
            head, head_weights = sentence_head_from_checkpoint(ckpt, config)
        model = cls(config, task, max_texts, head if task == "embed" else None)
        extra = {f"sentence_head.{k}": v for k, v in head_weights.items()} if task == "embed" else {}
        model.load_checkpoint_weights(load_state_dict(ckpt.path, ckpt.allow_pickle), str(ckpt.path), extra)
        return model.eval()

    def load_checkpoint_weights(self, tensors: dict, where: str, extra_state: dict | None = None) -> None:
        """Map the checkpoint's tensors onto our modules (plus `extra_state`, already in our names)."""
        prefix = "model." if any(k.startswith("model.") for k in tensors) else ""
        key_map = checkpoint_key_map(self.config, self.task, prefix)
        known_elsewhere = head_keys(self.config)                               # other tasks' heads: known, unused
        unknown = sorted(k for k in tensors if k not in set(key_map.values()) and k not in known_elsewhere)
        tied = f"{prefix}embeddings.tok_embeddings.weight"
        missing = sorted(src for dst, src in key_map.items()
                         if src not in tensors and not (dst == "decoder.weight" and tied in tensors))
        if unknown or missing:
            raise CheckpointError(f"weights in {where} do not match this ModernBERT config: "
                                  f"missing {_some(missing)}; unknown {_some(unknown)}")
        state = {}
        for dst, src in key_map.items():
            t = tensors[src] if src in tensors else tensors[tied]             # save_pretrained drops the tied decoder
            expected = self.state_dict()[dst].shape
            if t.dim() == 2 and len(expected) == 4:
                t = t[:, :, None, None]                                        # nn.Linear (out, in) -> 1x1 conv
            if tuple(t.shape) != tuple(expected):
                raise CheckpointError(f"weight {src} in {where} has shape {tuple(t.shape)}, expected {tuple(expected)}")
            state[dst] = t.float()
        self.load_state_dict({**state, **(extra_state or {})}, strict=True)


def sentence_head_from_checkpoint(ckpt: Checkpoint, config: ModernBertConfig) -> tuple[SentenceHead, dict]:
    """The SentenceHead of a sentence-transformers folder (checkpoint.sentence_modules: Pooling, Dense...,
    Normalize) and its weights; for a plain checkpoint, the config's classifier_pooling alone."""
    modules = sentence_modules(ckpt)
    dense, weights = [], {}
    for i, (weight, bias, act) in enumerate(modules.dense):
        if act not in DENSE_ACTIVATIONS:
            raise CheckpointError(f"{ckpt.root}: Dense activation {act} is not supported")
        weights[f"dense.{i}.weight"] = weight[:, :, None, None]               # (out, in) -> 1x1 conv
        if bias is not None:
            weights[f"dense.{i}.bias"] = bias
        dense.append((weight.shape[1], weight.shape[0], bias is not None, act))
    return SentenceHead(modules.pooling, dense, modules.normalize), weights


def _some(keys: list, n: int = 5) -> str:
    if not keys:
        return "none"
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def default_task(config: ModernBertConfig) -> str:
    for arch in config.architectures:
        if arch in ARCHITECTURE_TASKS:
            return ARCHITECTURE_TASKS[arch]
    return "encoder" if not config.architectures else "fill-mask"


def encoder_key_map(config: ModernBertConfig, prefix: str) -> dict:
    """Our parameter name -> the checkpoint's, for the encoder (transformers' ModernBertModel names)."""
    m = {"embeddings.tok_embeddings.weight": "embeddings.tok_embeddings.weight"}
    norms = ["embeddings.norm", "final_norm"]
    for i in range(config.num_hidden_layers):
        p = f"layers.{i}."
        norms += ([] if i == 0 else [p + "attn_norm"]) + [p + "mlp_norm"]
        linears = [p + "attn.Wqkv", p + "attn.Wo", p + "mlp.Wi", p + "mlp.Wo"]
        bias = {p + "attn.Wqkv": config.attention_bias, p + "attn.Wo": config.attention_bias,
                p + "mlp.Wi": config.mlp_bias, p + "mlp.Wo": config.mlp_bias}
        for name in linears:
            m[name + ".weight"] = name + ".weight"
            if bias[name]:
                m[name + ".bias"] = name + ".bias"
    for name in norms:
        m[name + ".weight"] = name + ".weight"
        if config.norm_bias:
            m[name + ".bias"] = name + ".bias"
    return {dst: prefix + src for dst, src in m.items()}


def task_head_key_map(config: ModernBertConfig, task: str) -> dict:
    """Our parameter name -> the checkpoint's, for a task head (these keys never carry the model. prefix)."""
    if task in ("encoder", "embed"):
        return {}
    m = {"head.dense.weight": "head.dense.weight", "head.norm.weight": "head.norm.weight"}
    if config.classifier_bias:
        m["head.dense.bias"] = "head.dense.bias"
    if config.norm_bias:
        m["head.norm.bias"] = "head.norm.bias"
    if task == "fill-mask":
        m["decoder.weight"] = "decoder.weight"
        if config.decoder_bias:
            m["decoder.bias"] = "decoder.bias"
    else:
        m["classifier.weight"] = "classifier.weight"
        m["classifier.bias"] = "classifier.bias"
    return m


def head_keys(config: ModernBertConfig) -> set:
    """Every head key any task could use: present in a checkpoint of another task, they are not unknown."""
    keys = set()
    for task in TASKS:
        keys |= set(task_head_key_map(config, task).values())
    return keys


def checkpoint_key_map(config: ModernBertConfig, task: str, prefix: str) -> dict:
    return {**encoder_key_map(config, prefix), **task_head_key_map(config, task)}
