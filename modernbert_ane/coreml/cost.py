"""FLOP and byte counts of a saved ML Program, per op, from its shapes: on any OS, without Core ML.

The program is read with the emulator's loader (`modernbert_ane/coreml/emulator/loader.py`), not rebuilt by coremltools. A
fixed-shape function declares every tensor's shape in the file; a flexible one (several `--seq-len`
values, `EnumeratedShapes`) leaves the sequence axes unknown there, so it is run once per length on the
emulator (all-zero ids) and the shapes are read off its outputs: the counts of a length are exact for
that length, whatever the graph does with it (blockwise attention, query chunks).

Conventions (one multiply-add is 2 FLOPs; these are the counts, not what a device executes):

| category | op types | FLOPs |
|---|---|---|
| conv | conv | 2 x (weight elements / output channels) per output element, + 1 per output with a bias |
| matmul | matmul, linear, einsum | 2 x (contracted length) per output element, + 1 per output with a bias |
| softmax | softmax | 5 per element (max, subtract, exp, sum, divide) |
| norm | layer_norm, batch_norm, instance_norm, l2_norm | 5 per element (mean, subtract, square, sum, scale), + 1 each for gamma and beta |
| reduction | reduce_* | 1 per input element (2 for sums of squares and L2 norms) |
| elementwise | every other computing op (add, mul, gelu, rsqrt, comparisons...) | 1 per output element |
| movement | transpose, reshape, slices, concat, split, gather, pad, cast... | 0: bytes only |

Bytes, at each tensor's declared dtype (float16: 2; sub-byte palette indices: their bit width):
`weight_bytes` is every constant tensor the ops read (weights, RoPE tables, mask constants; a
compressed weight counts as its stored parts), each once, as one prediction reads them;
`activation_bytes_read` / `activation_bytes_written` sum every op's non-constant inputs / outputs;
`largest_activation` is the largest single op output.
"""
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from modernbert_ane.coreml.package import Package, package_inputs

CONV_OPS = frozenset({"conv"})
MATMUL_OPS = frozenset({"matmul", "linear", "einsum"})
NORM_OPS = frozenset({"layer_norm", "batch_norm", "instance_norm", "l2_norm"})
SQUARE_REDUCTIONS = frozenset({"reduce_sum_square", "reduce_l2_norm"})
MOVEMENT_OPS = frozenset({
    "transpose", "reshape", "reshape_like", "expand_dims", "squeeze", "flatten2d", "slice_by_index",
    "slice_by_size", "concat", "stack", "split", "tile", "gather", "gather_nd", "gather_along_axis", "pad",
    "cast", "identity", "reverse", "shape", "fill", "fill_like", "range_1d", "sliding_windows", "one_hot"})
FLOAT_DTYPES = frozenset({"FLOAT16", "FLOAT32", "FLOAT64"})
CATEGORIES = ("conv", "matmul", "softmax", "norm", "reduction", "elementwise", "movement")


@dataclass(frozen=True)
class Op:
    """What counting needs of one op: its type, the names it reads per parameter, the names it writes."""
    op_type: str
    inputs: dict                         # parameter -> [variable or constant names]
    outputs: tuple                       # output names; the first names the op (as MLComputePlan does)


@dataclass
class OpCost:
    name: str
    op_type: str
    category: str
    flops: int
    weights: dict = field(default_factory=dict)     # constant name -> stored bytes
    read_bytes: int = 0                             # non-constant inputs
    written_bytes: int = 0
    shape: tuple = ()                               # the first output's shape


# ------------------------------------------------------------------ reading the program


def _emulator():
    import modernbert_ane.coreml.emulator
    return modernbert_ane.coreml.emulator


def dtype_bits(dtype_name: str) -> int:
    """Bits per element of a MIL dtype name ("FLOAT16" -> 16, "UINT4" -> 4), from the emulator's table."""
    npdt, nbits, _ = _emulator().loader.MIL_DTYPES.get(dtype_name, (None, 0, False))
    return nbits or (npdt.itemsize * 8 if npdt is not None else 0)


class Program:
    """One function of a saved package: its ops, each value's (dtype name, shape), the constants' stored
    bytes and the small constants' values (einsum equations, transpose flags)."""

    def __init__(self, package, function: str | None = None):
        """package: a Package (its spec is not parsed again) or a path."""
        emu, package = _emulator(), Package.of(package)
        spec, weights_dir = emu.loader.read_package(package.path, package.spec)
        functions = spec.mlProgram.functions
        function = function or spec.description.defaultFunctionName or "main"
        if function not in functions:
            raise ValueError(f"{package} has no function '{function}' (it has {', '.join(sorted(functions))})")
        self.package, self.function, self.spec = package.path, function, spec
        func = functions[function]
        reader = emu.loader.ProtoReader(weights_dir)
        self.types = {nvt.name: reader.tensor_type(nvt.type) for nvt in func.inputs}
        self.input_names = [nvt.name for nvt in func.inputs]
        self.ops, self.const_bytes, self.values = [], {}, {}
        for op in func.block_specializations[func.opset].operations:
            for o in op.outputs:
                self.types[o.name] = reader.tensor_type(o.type)
            names = {p: [b.name for b in arg.arguments if b.WhichOneof("binding") == "name"]
                     for p, arg in op.inputs.items()}
            if op.type == "const":
                self._add_const(op, reader)
            elif op.type.startswith("constexpr_"):          # decompressed at load: stored as its inputs
                stored = sum(self.const_bytes.get(b.name, 0) if b.WhichOneof("binding") == "name"
                             else self._value_bytes(b.value.type, reader)            # inline data and scales
                             for arg in op.inputs.values() for b in arg.arguments)
                stored += sum(self._value_bytes(v.type, reader) for k, v in op.attributes.items() if k != "name")
                for o in op.outputs:
                    self.const_bytes[o.name] = stored
            else:
                self.ops.append(Op(op.type, names, tuple(o.name for o in op.outputs)))

    def _value_bytes(self, value_type, reader) -> int:
        dtype, shape = reader.tensor_type(value_type)
        if shape is None or None in shape:
            return 0
        return int(np.prod(shape, dtype=np.int64)) * dtype_bits(dtype) // 8

    def _add_const(self, op, reader) -> None:
        name, val = op.outputs[0].name, op.attributes["val"]
        self.const_bytes[name] = self._value_bytes(op.outputs[0].type, reader)
        dtype = reader.tensor_type(op.outputs[0].type)[0]
        if val.WhichOneof("value") == "immediateValue" and dtype not in FLOAT_DTYPES and self.const_bytes[name] <= 64:
            try:
                self.values[name] = reader.value(val, name)
            except NotImplementedError:
                pass

    def is_static(self) -> bool:
        """Whether the file declares every shape (a single fixed length)."""
        return all(shape is not None and None not in shape for _, shape in self.types.values())

    def observed_shapes(self, length: int) -> dict:
        """name -> shape of every value when the function runs at `length` tokens on the emulator."""
        emu = _emulator().MLProgramEmulator(str(self.package), function_name=self.function, spec=self.spec)
        inputs = package_inputs([[0] * length], length, 0)          # ids 0, one text: shapes are all we read
        expected = iter((op.op_type, name) for op in self.ops for name in op.outputs)
        shapes = {name: tuple(np.shape(value)) for name, value in inputs.items()}

        def observe(op_name, op_type, value):
            expected_type, name = next(expected)             # the emulator runs the ops in file order
            assert op_type == expected_type, f"{op_name}: {op_type} observed, {expected_type} expected"
            shapes[name] = tuple(np.shape(value))
        emu.predict(inputs, observe=observe)
        return shapes

    def shapes_at(self, length: int | None) -> dict:
        """name -> (dtype name, shape) at `length` (the declared shapes for a static function)."""
        if self.is_static():
            return dict(self.types)
        observed = self.observed_shapes(length or self.static_length())
        return {name: (dtype, observed.get(name, shape)) for name, (dtype, shape) in self.types.items()}

    def static_length(self) -> int | None:
        shape = self.types.get("input_ids", (None, None))[1]
        return shape[-1] if shape and shape[-1] is not None else None


# ------------------------------------------------------------------ counting


def _size(shape) -> int:
    return int(np.prod(shape, dtype=np.int64)) if shape else 1


def category(op_type: str) -> str:
    if op_type in CONV_OPS:
        return "conv"
    if op_type in MATMUL_OPS:
        return "matmul"
    if op_type == "softmax":
        return "softmax"
    if op_type in NORM_OPS:
        return "norm"
    if op_type.startswith("reduce_"):
        return "reduction"
    if op_type in MOVEMENT_OPS:
        return "movement"
    return "elementwise"


def einsum_flops(equation: str, shapes: list) -> int:
    """2 x every index's length multiplied together when some index is summed; else one per output."""
    inputs, output = equation.replace(" ", "").split("->")
    sizes = {}
    for letters, shape in zip(inputs.split(","), shapes):
        sizes.update(zip(letters, shape))
    summed = [c for c in sizes if c not in output]
    total = _size([sizes[c] for c in sizes])
    return 2 * total if summed else total


def op_flops(op: Op, shape_of, value_of) -> int:
    """FLOPs of one op (conventions in the module docstring). shape_of(name) -> shape; value_of(name) ->
    a small constant's value or None."""
    out = _size(shape_of(op.outputs[0]))
    first = lambda p: (op.inputs.get(p) or [None])[0]
    bias = out if first("bias") else 0
    kind = category(op.op_type)
    if op.op_type == "conv":
        weight = shape_of(first("weight"))                        # (Cout, Cin / groups, kH, kW)
        return 2 * out * (_size(weight) // weight[0]) + bias
    if op.op_type == "matmul":
        x = shape_of(first("x"))
        transposed = bool(np.asarray(value_of(first("transpose_x")) or False).reshape(-1)[0])
        return 2 * out * (x[-2] if transposed and len(x) > 1 else x[-1])
    if op.op_type == "linear":
        return 2 * out * shape_of(first("x"))[-1] + bias
    if op.op_type == "einsum":
        equation = value_of(first("equation"))
        return einsum_flops(str(np.asarray(equation).reshape(-1)[0]), [shape_of(n) for n in op.inputs["values"]])
    if kind == "softmax":
        return 5 * out
    if kind == "norm":
        return (5 + bool(first("gamma")) + bool(first("beta"))) * out
    if kind == "reduction":
        return (2 if op.op_type in SQUARE_REDUCTIONS else 1) * _size(shape_of(first("x")))
    if kind == "movement":
        return 0
    return out


def op_costs(program: Program, length: int | None = None) -> list[OpCost]:
    """Every op's cost when the function runs at `length` tokens (None: its one fixed length)."""
    types = program.shapes_at(length)
    shape_of = lambda name: types[name][1]
    nbytes = lambda name: _size(types[name][1]) * dtype_bits(types[name][0]) // 8
    costs = []
    for op in program.ops:
        names = {n for ns in op.inputs.values() for n in ns}
        weights = {n: program.const_bytes[n] for n in names if _is_weight(n, program, types)}
        read = sum(nbytes(n) for n in names if n not in program.const_bytes)
        written = sum(nbytes(n) for n in op.outputs)
        costs.append(OpCost(op.outputs[0], op.op_type, category(op.op_type),
                            op_flops(op, shape_of, program.values.get), weights, read, written,
                            tuple(shape_of(op.outputs[0]))))
    return costs


def _is_weight(name: str, program: Program, types: dict) -> bool:
    """A constant tensor of floats (a decompressed weight too), not an op's integer or string parameters."""
    return name in program.const_bytes and types[name][0] in FLOAT_DTYPES


# ------------------------------------------------------------------ summaries


def summarize(costs: list[OpCost]) -> dict:
    """Totals of a list of op costs: plain data (JSON), what convert.py stores in the metadata."""
    by_category, by_type, counts = Counter(), Counter(), Counter()
    weights = {}
    for c in costs:
        by_category[c.category] += c.flops
        by_type[c.op_type] += c.flops
        counts[c.op_type] += 1
        weights.update(c.weights)
    largest = max(costs, key=lambda c: c.written_bytes, default=None)
    return {
        "ops": len(costs),
        "flops": sum(by_category.values()),
        "flops_by_category": {k: by_category[k] for k in CATEGORIES if by_category[k]},
        "flops_by_op_type": dict(sorted(by_type.items(), key=lambda kv: (-kv[1], kv[0]))),
        "ops_by_type": dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))),
        "weight_bytes": sum(weights.values()),
        "activation_bytes_read": sum(c.read_bytes for c in costs),
        "activation_bytes_written": sum(c.written_bytes for c in costs),
        "largest_activation": None if largest is None else {
            "op": largest.name, "op_type": largest.op_type, "shape": list(largest.shape),
            "bytes": largest.written_bytes},
    }


def package_costs(package, function: str | None = None, lengths=None) -> dict[int, dict]:
    """length -> summarize() of one function of a package, at each of `lengths` (default: every length the
    function accepts). A flexible function is run once per length on the emulator to learn its shapes."""
    package = Package.of(package)
    program = Program(package, function)
    fixed = program.static_length()
    lengths = [fixed] if fixed is not None else list(lengths or package.lengths(program.function))
    return {n: summarize(op_costs(program, n)) for n in lengths}       # n is ignored where the file has the shapes


def metadata_entry(costs: dict[int, dict]) -> dict:
    """The part of package_costs() kept in the package metadata (`modernbert_ane.cost`), by length."""
    keys = ("flops", "flops_by_category", "weight_bytes", "activation_bytes_read", "activation_bytes_written",
            "largest_activation")
    return {str(n): {k: summary[k] for k in keys} for n, summary in costs.items()}


def format_bytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def format_summary(length: int, summary: dict) -> list[str]:
    """Readable lines of one length's counts (convert.py's readiness summary)."""
    parts = ", ".join(f"{k} {v / 1e9:.3g}" for k, v in summary["flops_by_category"].items())
    largest = summary["largest_activation"]
    lines = [f"at {length} tokens: {summary['flops'] / 1e9:.3g} GFLOP ({parts}); weights read "
             f"{format_bytes(summary['weight_bytes'])}, activations written "
             f"{format_bytes(summary['activation_bytes_written'])}"]
    if largest:
        lines.append(f"  largest activation: {largest['op_type']} {largest['op']} {tuple(largest['shape'])}, "
                     f"{format_bytes(largest['bytes'])}")
    return lines
