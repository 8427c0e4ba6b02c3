"""SpinQuant's learned residual rotation R1, for W8A8 (`convert.py --rotation learned --compress w8a8`).

The residual rotation Q is optimized, starting from the randomized Hadamard of the same seed, to minimize
the error of the W8A8-simulated model on the calibration texts (activation_quant.CALIBRATION_TEXTS):
int8 weights per output channel and int8 activations per tensor at every quantized conv's input, both
fake-quantized with a straight-through gradient (activation_quant.fake_quant), against the float32
unrotated model's encoder output (the final norm's output, back in the original basis: the heads are not
rotated, so R1 changes nothing after it). Q = cayley(A) H with A skew-symmetric, cayley(A) =
(I - A)^-1 (I + A): every Q it reaches is orthogonal, so Adam on A's free entries is an unconstrained
problem (SpinQuant uses Cayley SGD on the Stiefel manifold; the parametrization reaches the same rotations
near H). A = 0 gives Q = H exactly, so zero steps is the Hadamard.

Activation scales are taken from the calibration batch at each step (its max |x| per tensor), which is
what the static calibration of activation_quant.calibrate gives the converted package for the rotation
finally chosen. Training is float32 (speed); the returned Q is recomputed from A in float64, orthogonal
to ~1e-15, and fused by rotations/fuse.py in float64 as every rotation is. Deterministic for a seed and a
thread count (no sampling: every step sees the whole calibration batch; init A = 0).
"""
import numpy as np
import torch
from torch import nn

from modernbert_ane.activation_quant import QMAX, activation_scale, fake_quant, quantized_convs
from modernbert_ane.model import ModernBert, RMSNorm
from modernbert_ane.rotations.hadamard import rotation_matrix

DEFAULT_STEPS = 20
LEARNING_RATE = 1e-3


def stream_convs(model: ModernBert) -> tuple[list[str], list[str]]:
    """(readers, writers) of a model rotated by rotations/fuse.py: the convs whose weights carry Q^T on their
    input (after an RMSNorm of the stream) and those that write Q x into the stream."""
    readers, writers = ["final_proj"], ["embeddings.proj"]
    for i, block in enumerate(model.layers):
        if isinstance(block.attn_norm, RMSNorm):                # layer 0 reads the embedding norm, unrotated
            readers.append(f"layers.{i}.attn.Wqkv")
        readers.append(f"layers.{i}.mlp.Wi")
        writers += [f"layers.{i}.attn.Wo", f"layers.{i}.mlp.Wo"]
    return readers, writers


def cayley(A: torch.Tensor) -> torch.Tensor:
    """(I - S)^-1 (I + S) with S = A - A^T: orthogonal for every A."""
    S = A - A.T
    eye = torch.eye(A.shape[0], dtype=A.dtype)
    return torch.linalg.solve(eye - S, eye + S)


class _Encoder(nn.Module):
    def __init__(self, model: ModernBert):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model.encode(input_ids, attention_mask)                    # (B, C, 1, S)


def fake_quant_weight(w: torch.Tensor) -> torch.Tensor:
    """int8 per output channel, symmetric (convert.compressed_rows' rounding), straight-through gradient."""
    scale = w.detach().abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12) / QMAX   # (out, 1, 1, 1)
    return fake_quant(w, scale)


def rotated_weights(base: dict, readers, writers, Q: torch.Tensor) -> dict:
    """The stream convs' weights (and writers' biases) for rotation Q of an identity-folded model."""
    out = {}
    for name in readers:
        w = base[f"{name}.weight"]                                             # (out, C, 1, 1)
        out[f"{name}.weight"] = (w[:, :, 0, 0] @ Q.T)[:, :, None, None]
    for name in writers:
        w = base[f"{name}.weight"]                                             # (C, in, 1, 1)
        out[f"{name}.weight"] = (Q @ w[:, :, 0, 0])[:, :, None, None]
        if f"{name}.bias" in base:
            out[f"{name}.bias"] = Q @ base[f"{name}.bias"]
    return out


def w8a8_params(model: ModernBert, base: dict, readers, writers, Q: torch.Tensor) -> dict:
    """Every quantized conv's weight fake-quantized (int8 per channel), the stream convs rotated by Q first."""
    params = {**base, **rotated_weights(base, readers, writers, Q)}
    for name in quantized_convs(model):
        params[f"{name}.weight"] = fake_quant_weight(params[f"{name}.weight"])
    return params


def dynamic_activation_hooks(model: ModernBert, valid: torch.Tensor) -> list:
    """Fake-quantize every quantized conv's input at the scale of its largest |value| over the valid tokens."""
    def hook(_module, inputs):
        x = inputs[0]                                                          # (B, C, 1, S)
        peak = float(x.detach().abs().masked_fill(~valid, 0.0).max())
        return (fake_quant(x, activation_scale(peak)),)
    return [m.register_forward_pre_hook(hook) for m in quantized_convs(model).values()]


def relative_error(ours: torch.Tensor, ref: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """sum of squared errors over sum of squares, valid tokens only."""
    mask = valid.to(ref.dtype)                                                 # (B, 1, 1, S)
    return ((ours - ref) ** 2 * mask).sum() / ((ref ** 2) * mask).sum()


def learn_rotation(model: ModernBert, input_ids: torch.Tensor, attention_mask: torch.Tensor, steps: int = DEFAULT_STEPS,
                   seed: int = 0, lr: float = LEARNING_RATE, log=None) -> tuple[np.ndarray, list[float]]:
    """(Q, losses): the learned rotation (float64, C x C) of an unrotated float32 `model` (left unchanged) and
    the W8A8 relative error of the encoder output before each step and after the last. Q is the best iterate
    (lowest error; the Hadamard itself when no step improved on it): a few noisy steps never make it worse
    than the start on the calibration texts."""
    from modernbert_ane.rotations.fuse import rotate_model
    import copy
    if model.rotation is not None:
        raise ValueError("learn_rotation needs the unrotated model")
    valid = attention_mask[:, None, None, :] > 0                               # (B, 1, 1, S)
    with torch.no_grad():
        ref = model.encode(input_ids, attention_mask)                          # (B, C, 1, S) float32 target
    folded = rotate_model(copy.deepcopy(model).float(), "identity")            # norms folded, stream centred
    encoder = _Encoder(folded)
    base = {k.removeprefix("model."): v.detach() for k, v in encoder.named_parameters()}
    readers, writers = stream_convs(folded)
    H = torch.from_numpy(rotation_matrix("hadamard", folded.config.hidden_size, seed))   # (C, C) float64
    A = torch.zeros_like(H, dtype=torch.float32, requires_grad=True)
    optimizer = torch.optim.Adam([A], lr=lr)
    hooks = dynamic_activation_hooks(folded, valid)
    losses, best = [], (float("inf"), None)
    try:
        for step in range(steps + 1):
            Q = cayley(A) @ H.float()                                          # (C, C)
            params = {f"model.{k}": v for k, v in w8a8_params(folded, base, readers, writers, Q).items()}
            loss = relative_error(torch.func.functional_call(encoder, params, (input_ids, attention_mask)), ref, valid)
            losses.append(loss.item())
            if losses[-1] < best[0]:
                best = (losses[-1], A.detach().clone())
            if log:
                log(step, losses[-1])
            if step == steps:
                break
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        Q64 = cayley(best[1].double()) @ H                                  # float64: orthogonal to ~1e-15
    return Q64.numpy(), losses
