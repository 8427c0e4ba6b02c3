"""Run a Core ML ML Program (``.mlpackage``) with NumPy, storing every tensor as float16.

Core ML prediction only exists on macOS. This module loads a saved ``.mlpackage`` on any
platform and executes one function of its MIL program (default ``"main"``) op by op in
topological order. It knows nothing about any particular model: it is a generic ML Program
interpreter.

Loading reads the package's ``Model.proto`` (``Data/com.apple.CoreML/model.mlmodel``) directly
and the weights through coremltools' native blob reader. (coremltools' own
``milproto.load.load`` also works, but rebuilds a pymil program with type inference for every
op: ~15 s for a 15k-op encoder, versus ~1.5 s here.) Weight-compression ops
(``constexpr_*``: affine_dequantize, cast, lut_to_dense, sparse_to_dense, blockwise_shift_scale,
sparse_blockwise_shift_scale, lut_to_sparse; iOS16 and iOS18 flavours) are decompressed once
at load time. Shapes are never materialized: flexible inputs (``EnumeratedShapes``, ranges)
simply run with the actual arrays (``shape``, ``range_1d``, ``fill``, dynamic ``reshape``...
compute on real values). Intermediate values are freed after their last use.

Numerics (the default, ``pessimistic=False``)
    Every op computes in float32 internally and its output is then rounded to float16, the
    way the Apple Neural Engine stores tensors. Values beyond +-65504 become +-inf. This applies
    to *all* float outputs, including ones the program declares as fp32, and to float
    constants (weights, epsilons, ...), which are rounded to float16 when the package is
    loaded. Integer and bool outputs keep their declared dtype; narrowing an integer to a
    dtype that cannot hold it (e.g. ``cast`` of token id 40000 to int16) raises
    :class:`EmulationError` instead of wrapping silently, and so do out-of-range
    gather/scatter indices. Negative indices count from the end, like NumPy.
    Function inputs are cast to the dtypes the program declares (an fp16 input is rounded,
    an fp32 input is kept as given until the first op consumes it).
    ``scaled_dot_product_attention`` is treated as its decomposition
    (matmul -> scale + mask -> softmax -> matmul): the scores and the attention
    probabilities are rounded to float16 too, as they are materialized on the hardware.

Pessimistic mode (``pessimistic=True``)
    Ops that are numerically fragile in float16 also round their *internal* steps to
    float16: layer_norm, batch_norm, instance_norm, l2_norm, softmax (also inside
    scaled_dot_product_attention), reduce_sum / reduce_mean / reduce_l1_norm /
    reduce_l2_norm / reduce_sum_square / reduce_log_sum / reduce_log_sum_exp, and float
    cumsum. Sums are accumulated in float16 by pairwise (tree) reduction with every partial
    sum rounded; e.g. layer_norm rounds the mean, the centered values, their squares
    (which overflow to inf beyond ~256), the variance, ``var + eps`` and the rsqrt, then each
    product. Softmax rounds ``x - max``, ``exp``, the sum and the quotient. Where an
    intermediate overflowed, the result is poisoned to NaN instead of being silently absorbed
    (``rsqrt(inf) = 0`` would otherwise turn an overflow into plausible-looking zeros).
    Matrix products (conv, linear, matmul, einsum) still accumulate in float32.
    This mode *over-approximates* what float16 hardware can do: real hardware may use wider
    accumulators or fused kernels, so a model whose activations stay finite and accurate
    under pessimistic mode is safe to run in float16; a model that fails only in pessimistic
    mode *may* still be fine on the device.

Outputs
    :meth:`MLProgramEmulator.predict` returns float outputs as **float32 arrays holding
    float16-representable values**, integer outputs with their declared integer dtype and
    bool outputs as bool.

Not supported (raise :class:`UnsupportedOpError`): control flow (``cond``/``while_loop``),
states (``read_state``/``write_state``), list ops, pooling, image resizing, recurrent
layers, random ops, ``conv_transpose`` and other ops not listed in ``supported_op_types()``.

Layout: numerics (float16 rounding, float16 sums), registry (the op table), one module per op family
(elementwise, linalg, reductions, gathers, shapes, constexpr, quantization), loader (the package's proto and weights),
interpreter (MLProgramEmulator). Importing this package registers every op.

Import note: coremltools is imported lazily through ``quiet_coremltools``.
"""
from . import constexpr, elementwise, gathers, linalg, quantization, reductions, shapes
from .errors import EmulationError, NotAnMLPackageError, UnsupportedOpError
from .interpreter import MLProgramEmulator
from .registry import supported_op_types

# the op families: importing each registers its ops in the table the interpreter reads
OP_MODULES = (elementwise, linalg, reductions, gathers, shapes, constexpr, quantization)

__all__ = [
    "MLProgramEmulator",
    "UnsupportedOpError",
    "NotAnMLPackageError",
    "EmulationError",
    "supported_op_types",
]
