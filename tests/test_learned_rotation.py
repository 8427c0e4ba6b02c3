"""rotations/learned.py: SpinQuant's learned R1 is orthogonal, preserves the float32 function, is deterministic."""
import copy

import numpy as np
import pytest
import torch

from modernbert_ane.activation_quant import CALIBRATION_TEXTS
from modernbert_ane.checkpoint import resolve_checkpoint
from checkpoints import build_tokenizer
from modernbert_ane.evaluation import EVAL_TEXTS, tokenize
from modernbert_ane.model import ModernBert
from modernbert_ane.rotations import rotate_model, rotation_matrix
from modernbert_ane.rotations.learned import cayley, learn_rotation

STEPS = 3


@pytest.fixture(scope="module")
def learned(checkpoint_factory):
    """(unrotated model, calibration batch, Q, losses) after STEPS steps on the tiny checkpoint."""
    model = ModernBert.from_checkpoint(resolve_checkpoint(str(checkpoint_factory("tiny"))), "fill-mask").eval()
    calibration = tokenize(build_tokenizer(), CALIBRATION_TEXTS, 48)
    Q, losses = learn_rotation(model, *calibration, steps=STEPS, seed=0)
    return model, calibration, Q, losses


def test_cayley_is_orthogonal():
    A = torch.randn(24, 24, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    Q = cayley(A)
    np.testing.assert_allclose((Q.T @ Q).numpy(), np.eye(24), atol=1e-12)
    np.testing.assert_array_equal(cayley(torch.zeros(5, 5)).numpy(), np.eye(5))


def test_learned_rotation_is_orthogonal_and_moved(learned):
    model, _, Q, losses = learned
    C = model.config.hidden_size
    assert Q.dtype == np.float64 and Q.shape == (C, C)
    np.testing.assert_allclose(Q.T @ Q, np.eye(C), atol=1e-12)
    Q32 = Q.astype(np.float32)
    np.testing.assert_allclose(Q32.T @ Q32, np.eye(C, dtype=np.float32), atol=1e-6)
    assert len(losses) == STEPS + 1 and all(np.isfinite(losses))
    H = rotation_matrix("hadamard", C, 0)
    if min(losses) < losses[0]:                      # a step improved on the Hadamard: that iterate is returned
        assert not np.allclose(Q, H)
    else:
        np.testing.assert_array_equal(Q, H)


def test_zero_steps_is_the_hadamard(learned):
    model, calibration, _, _ = learned
    Q, losses = learn_rotation(model, *calibration, steps=0, seed=1)
    np.testing.assert_allclose(Q, rotation_matrix("hadamard", model.config.hidden_size, 1), atol=1e-15)
    assert len(losses) == 1


def test_learned_rotation_preserves_the_float32_function(learned, checkpoint_factory):
    model, _, Q, _ = learned
    rotated = rotate_model(copy.deepcopy(model), "learned", matrix=Q)
    ids, mask = tokenize(build_tokenizer(), EVAL_TEXTS[:4], 48)
    with torch.no_grad():
        ref, ours = model(ids, mask), rotated(ids, mask)
    valid = mask > 0
    err = (ours - ref)[valid].abs().max() / ref[valid].abs().max()
    assert err < 1e-4, float(err)
    with pytest.raises(ValueError):
        rotate_model(copy.deepcopy(model), "learned")                # no matrix
    with pytest.raises(ValueError):
        learn_rotation(rotated, ids, mask, steps=1)                   # already rotated


def test_learned_rotation_is_deterministic(learned):
    model, calibration, Q, losses = learned
    Q2, losses2 = learn_rotation(model, *calibration, steps=STEPS, seed=0)
    assert Q.tobytes() == Q2.tobytes() and losses == losses2
    Q3, _ = learn_rotation(model, *calibration, steps=STEPS, seed=1)
    assert not np.allclose(Q, Q3)
