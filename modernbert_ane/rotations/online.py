"""QuaRot's online Hadamard on the MLP intermediate, before the down projection (`convert.py --mlp-rotation`).

No residual-stream rotation reaches the input of `mlp.Wo`: it is the GeGLU product act(inp) * gate, made
after the nonlinearity, in the intermediate basis (I channels). A unit that fires massively there (the way
trained models grow their massive activations, and tests/checkpoints.plant_mlp_outliers) sets W8A8's
per-tensor scale of that input alone. QuaRot rotates it online: the MLP computes Wo' (H a) with H orthogonal
(I x I) and Wo' = Wo H^T fused offline, so the product is unchanged in real arithmetic and one massive channel
of a is spread over the channels of H a (its peak divided by about sqrt(block)).

Kinds (MLP_ROTATION_KINDS):
- "hadamard": H = a randomized Hadamard of order I (rotations/hadamard.py: Sylvester x Paley, 1152 = 32 x 36,
  384 = 32 x 12), one dense I x I 1x1 conv per layer: spreads over all I channels;
- "block-hadamard": H = blockdiag(Hb, ..., Hb), Hb a randomized Hadamard of order b, the largest order <= 128
  that divides I and has a construction (1152, 384: 128): a grouped 1x1 conv (I/b groups), b/I of the
  dense conv's weights and FLOPs, spreading over b channels.
Every layer gets the same matrix (same seed), so identical constants may be stored once by Core ML's
const deduplication. All arithmetic is float64; weights are cast back to the model's dtype at the end.
"""
import numpy as np
import torch
from torch import nn

from modernbert_ane.model import Conv
from modernbert_ane.rotations.hadamard import NoHadamardConstructionError, has_hadamard, random_hadamard
from modernbert_ane.user_errors import UserError

MLP_ROTATION_KINDS = ("none", "hadamard", "block-hadamard")
MAX_BLOCK = 128                  # block-hadamard: the largest block order (Hadamard order dividing I) considered


def block_order(kind: str, inner: int) -> int:
    """The order of H's diagonal blocks for `kind` at intermediate size `inner` (I itself for "hadamard");
    NoHadamardConstructionError (one line, with the alternative) when there is none."""
    if kind == "hadamard":
        if not has_hadamard(inner):
            raise NoHadamardConstructionError(
                f"--mlp-rotation hadamard: no Hadamard matrix of order {inner} (the intermediate size) can be "
                f"built; use --mlp-rotation block-hadamard or none")
        return inner
    if kind == "block-hadamard":
        orders = [b for b in range(2, min(MAX_BLOCK, inner) + 1) if inner % b == 0 and has_hadamard(b)]
        if not orders:
            raise NoHadamardConstructionError(
                f"--mlp-rotation block-hadamard: no Hadamard order from 2 to {MAX_BLOCK} divides the intermediate "
                f"size {inner}; use --mlp-rotation none")
        return max(orders)
    raise ValueError(f"unknown MLP rotation '{kind}' (one of {', '.join(MLP_ROTATION_KINDS)})")


def check_mlp_rotation(kind: str, config: dict) -> None:
    """Before any work: a one-line UserError when `kind` cannot be built for the checkpoint config's intermediate
    size (as checkpoint.check_rotation does for the residual rotation)."""
    if kind == "none":
        return
    try:
        block_order(kind, config.get("intermediate_size", 1152))
    except NoHadamardConstructionError as e:
        raise UserError(str(e)) from e


def mlp_rotation_block(kind: str, inner: int, seed: int = 0) -> np.ndarray:
    """The (b, b) float64 orthogonal block of H (b = block_order): a Hadamard with random column signs."""
    return random_hadamard(block_order(kind, inner), seed)


def block_diagonal(block: np.ndarray, inner: int) -> np.ndarray:
    """H = blockdiag(block, ..., block), (inner, inner) float64."""
    return np.kron(np.eye(inner // block.shape[0]), block)


def rotation_conv(block: np.ndarray, inner: int, dtype: torch.dtype) -> nn.Conv2d:
    """H a as a 1x1 conv on (B, I, 1, S): dense for one block of order I, else grouped (one group per block)."""
    b = block.shape[0]
    conv = Conv(inner, inner, kernel_size=1, groups=inner // b, bias=False)        # ANE: grouped 1x1 conv, no reshape
    weight = np.tile(block, (inner // b, 1))                   # (I, b): group k's output rows hold the block
    conv.weight = nn.Parameter(torch.from_numpy(weight[:, :, None, None]).to(dtype), requires_grad=False)
    return conv


@torch.no_grad()
def rotate_mlps(model, kind: str = "hadamard", seed: int = 0):
    """Give every layer's MLP the online rotation H before Wo and fuse Wo' = Wo H^T (in place; the function
    computed is unchanged). Independent of the residual rotation (rotations/fuse.py) and applied before it:
    that one then centres and rotates Wo' on its output side. `none` changes nothing."""
    if kind not in MLP_ROTATION_KINDS:
        raise ValueError(f"unknown MLP rotation '{kind}' (one of {', '.join(MLP_ROTATION_KINDS)})")
    if kind == "none":
        return model
    if model.mlp_rotation is not None:
        raise ValueError("the MLPs are already rotated")
    if model.rotation is not None:
        raise ValueError("rotate the MLPs before the residual stream (rotations/fuse.py expects them done)")
    inner = model.config.intermediate_size
    block = mlp_rotation_block(kind, inner, seed)
    H = block_diagonal(block, inner)                                            # (I, I)
    for layer in model.layers:
        Wo = layer.mlp.Wo
        dtype = Wo.weight.dtype
        W = Wo.weight.detach().double().numpy()[:, :, 0, 0]                    # (C, I)
        Wo.weight = nn.Parameter(torch.from_numpy((W @ H.T)[:, :, None, None]).to(dtype))
        layer.mlp.rotation = rotation_conv(block, inner, dtype)
    model.mlp_rotation = {"kind": kind, "block": block.shape[0], "seed": seed}
    return model
