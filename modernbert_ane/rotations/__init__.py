"""QuaRot/SpinQuant-style orthogonal rotations fused into ModernBERT's weights, so float16 can carry it.

`hadamard` builds the matrices; `fuse` folds the norms and rotates the residual stream."""
from modernbert_ane.rotations.fuse import ROTATION_KINDS, rotate_model
from modernbert_ane.rotations.hadamard import NoHadamardConstructionError, rotation_matrix

__all__ = ["ROTATION_KINDS", "rotate_model", "rotation_matrix", "NoHadamardConstructionError"]
