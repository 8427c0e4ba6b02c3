"""Fold the norms and one orthogonal rotation of the residual stream into ModernBERT's weights.

Column-vector convention: a conv computes y = W x + b with W (out, in). The rotated model carries
r~ = Q c(r) on its residual stream, where c(r) = r - mean(r) and Q is orthogonal (C, C):
- readers (the convs after a norm) see RMSNorm(r~) = Q c(r)/rms(c(r)): they absorb the norm's
  weight g and bias beta and undo Q:    W' = W diag(g) Q^T,  b' = b + W beta;
- writers (attention and MLP output convs) centre and rotate what they add: W' = Q C W, b' = Q C b,
  with C = I - 11^T/n, so the stream stays zero-mean and every LayerNorm is an RMSNorm;
- the embedding norm sits before layer 0, whose attention has no norm of its own (a ModernBERT
  quirk) and so reads the stream raw: rotated, the massive values of a few channels would reach its
  qkv conv spread over every channel, rounded in float16 at their large magnitude (an error of ~4 on
  every channel of a delimiter token), and its weights, near zero on those channels, could no longer
  ignore them. So the embedding norm keeps its normalization only (inputs are small, float16-safe),
  layer 0's qkv conv absorbs the norm's weight and reads it in the original basis, and a C x C conv
  `embeddings.proj` = Q C diag(g) (bias Q C beta) writes the rotated, centred stream;
- the final norm's weight and bias, with Q^T, go into `final_proj`, so the encoder's output is in
  the original basis again (every head, pooling and user sees transformers' hidden states).

What it buys: a massive activation a in k channels is spread over all n channels, so the largest
value drops to about k a / sqrt(n) (768 wide, k = 2: 3e4 -> about 2e3), and RMSNorm never squares
anything larger than 1 (see model.RMSNorm). Nothing is added at inference beyond two C x C convs
(`embeddings.proj`, `final_proj`): everything else is fused.

Rotations not applied here: a per-head Hadamard on values/outputs (QuaRot) targets int4 activation
quantization; in float16 the values and attention outputs carry no massive activations (the norms in
front of them remove the scale). The online one on the MLP intermediate, for W8A8 with MLP-born outliers,
is rotations/online.py (`--mlp-rotation`), applied before this one.

All arithmetic is float64; results are cast back to the model's dtype at the end of each function.
"""
import re

import numpy as np
import torch
from torch import nn

from modernbert_ane.model import ModernBert, RMSNorm, LayerNorm, conv1x1
from modernbert_ane.rotations.hadamard import rotation_matrix

ROTATION_KINDS = ("hadamard", "random", "identity", "none")
SEEDED_KINDS = ("hadamard", "random", "learned")
LEARNED = "learned"              # Q given by rotations/learned.py (started from the seed's Hadamard)
# The two C x C convs a rotation adds (module names). Compression keeps them float16: `embeddings.proj` carries the
# embedding norm's weight, thousands on massive channels, which one int8 scale or palette per row would crush
# (convert.compress_weights); W8A8 leaves their inputs float16 too (activation_quant).
ROTATION_CONVS = ("embeddings.proj", "final_proj")
# The online MLP rotations (rotations/online.py), one per layer: their input is the outlier-laden GeGLU product
# they exist to spread, so it stays float16, and so do their +-1/sqrt(b) weights.
MLP_ROTATION_CONV = re.compile(r"layers\.\d+\.mlp\.rotation")


def kept_float16(name: str) -> bool:
    """Whether the conv of module `name` keeps float16 weights and inputs under every --compress (the one rule
    convert.compress_weights, convert.simulate_compression and activation_quant.quantized_convs apply)."""
    return name in ROTATION_CONVS or MLP_ROTATION_CONV.fullmatch(name) is not None


def float16_convs(model) -> list[str]:
    """The module names of `model`'s convs that kept_float16 keeps, in module order."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and kept_float16(name)]


def conv_weight(conv: nn.Conv2d) -> np.ndarray:
    return conv.weight.detach().double().numpy()[:, :, 0, 0]                  # (out, in)


def conv_bias(conv: nn.Conv2d) -> np.ndarray:
    return np.zeros(conv.out_channels) if conv.bias is None else conv.bias.detach().double().numpy()


def set_conv(conv: nn.Conv2d, weight: np.ndarray, bias: np.ndarray | None) -> None:
    """Write float64 weight (out, in) and bias back, cast to the conv's dtype; adds a bias if needed."""
    dtype = conv.weight.dtype
    conv.weight = nn.Parameter(torch.from_numpy(weight[:, :, None, None]).to(dtype))
    if bias is not None and (conv.bias is not None or np.any(bias != 0)):
        conv.bias = nn.Parameter(torch.from_numpy(bias).to(dtype))


def norm_params(norm: LayerNorm) -> tuple[np.ndarray, np.ndarray]:
    g = norm.weight.detach().double().numpy()
    beta = np.zeros_like(g) if norm.bias is None else norm.bias.detach().double().numpy()
    return g, beta


def centering_matrix(n: int) -> np.ndarray:
    return np.eye(n) - np.full((n, n), 1.0 / n)


def fuse_norm_into_reader(norm: LayerNorm | None, conv: nn.Conv2d, Q: np.ndarray) -> None:
    """conv(norm(r)) == conv'(RMSNorm(Q c(r))): W' = W diag(g) Q^T, b' = b + W beta (no norm: g = 1)."""
    W, b = conv_weight(conv), conv_bias(conv)
    if norm is not None:
        g, beta = norm_params(norm)
        W, b = W * g[None, :], b + W @ beta
    set_conv(conv, W @ Q.T, b)


def rotate_writer(conv: nn.Conv2d, Q: np.ndarray) -> None:
    """A conv adding to the residual stream writes Q C (W x + b): centred, then rotated."""
    QC = Q @ centering_matrix(Q.shape[0])
    set_conv(conv, QC @ conv_weight(conv), QC @ conv_bias(conv))


def fold_embedding_norm(model: ModernBert, Q: np.ndarray) -> None:
    """The embedding norm keeps only its normalization; its weight and bias go two ways: into layer 0's
    qkv conv (original basis, see module docstring) and into `embeddings.proj`, which writes the stream."""
    emb, attn0 = model.embeddings, model.layers[0].attn
    g, beta = norm_params(emb.norm)
    W, b = conv_weight(attn0.Wqkv), conv_bias(attn0.Wqkv)
    set_conv(attn0.Wqkv, W * g[None, :], b + W @ beta)
    QC = Q @ centering_matrix(Q.shape[0])
    emb.proj = conv1x1(Q.shape[0], Q.shape[0], bias=True).to(emb.tok_embeddings.weight.dtype)
    set_conv(emb.proj, QC * g[None, :], QC @ beta)
    emb.norm.weight.data.fill_(1.0)
    emb.norm.bias = None


def fold_final_norm(model: ModernBert, Q: np.ndarray) -> None:
    """final_norm(r) = final_proj(RMSNorm(r~)) with final_proj = diag(g) Q^T, bias beta."""
    g, beta = norm_params(model.final_norm)
    C = Q.shape[0]
    proj = conv1x1(C, C, bias=True).to(model.embeddings.tok_embeddings.weight.dtype)
    set_conv(proj, g[:, None] * Q.T, beta)
    model.final_proj = proj
    model.final_norm = RMSNorm(model.config.norm_eps, "final_norm")


def rotate_block(block, Q: np.ndarray) -> None:
    eps = block.mlp_norm.eps
    attn_norm = block.attn_norm if isinstance(block.attn_norm, LayerNorm) else None   # layer 0: Identity
    if attn_norm is not None:                     # layer 0's qkv reads the embedding norm: fold_embedding_norm
        fuse_norm_into_reader(attn_norm, block.attn.Wqkv, Q)
    rotate_writer(block.attn.Wo, Q)
    fuse_norm_into_reader(block.mlp_norm, block.mlp.Wi, Q)
    rotate_writer(block.mlp.Wo, Q)
    if attn_norm is not None:
        block.attn_norm = RMSNorm(eps, attn_norm.name)
    block.mlp_norm = RMSNorm(eps, block.mlp_norm.name)


@torch.no_grad()
def rotate_model(model: ModernBert, kind: str = "hadamard", seed: int = 0,
                 matrix: np.ndarray | None = None) -> ModernBert:
    """Fold norms and rotate the residual stream in place; the function computed is unchanged.
    kind: "hadamard" (randomized Hadamard), "random" (random orthogonal), "identity" (Q = I: the norms folded
    and the stream centred, SliceGPT's trick alone, so every norm is an RMSNorm and no massive value is
    spread; a centring LayerNorm in float16 loses the small components of a token that carries a massive
    one, its mean offset being ~1000x larger) or "none" (no change); LEARNED: `matrix`, an orthogonal (C, C)
    from rotations/learned.py."""
    if (kind == LEARNED) != (matrix is not None):
        raise ValueError("a matrix is given with the learned rotation, and only with it")
    if kind not in ROTATION_KINDS + (LEARNED,):
        raise ValueError(f"unknown rotation '{kind}' (one of {', '.join(ROTATION_KINDS)})")
    if kind == "none":
        return model
    if model.rotation is not None:
        raise ValueError("model is already rotated")
    C = model.config.hidden_size
    Q = matrix if kind == LEARNED else np.eye(C) if kind == "identity" else rotation_matrix(kind, C, seed)
    fold_embedding_norm(model, Q)
    for block in model.layers:
        rotate_block(block, Q)
    fold_final_norm(model, Q)
    model.rotation = {"kind": kind, "seed": seed, "matrix": Q}
    return model
