"""An ANE-readiness summary of an ML Program: op counts, ops or shapes known to push work off the
Neural Engine, the largest intermediate tensor, the weights' size on disk and, per length, the FLOP and
byte counts of `coreml/cost.py`.

The rules are reported behaviour (Apple's ANE transformers notes, coremltools issues), not a
guarantee: Core ML decides placement on the device. Xcode's performance report is the ground truth.
"""
from collections import Counter
from pathlib import Path

import numpy as np

from modernbert_ane.coreml.cost import format_summary
from modernbert_ane.coreml.quiet_coremltools import import_coremltools

import_coremltools()
from coremltools.converters.mil.mil import types  # noqa: E402  (after the quiet import)

ANE_MAX_AXIS = 16384            # larger axes have been seen to send an op to the GPU/CPU
RULES = {
    "rank>4": "tensors of rank 5+ (the Neural Engine works on rank <= 4; rank-5 views break ANE compilation)",
    "axis>16384": f"an axis longer than {ANE_MAX_AXIS} (such ops have been seen to run off the Neural Engine)",
    "float32-compute": "float32 arithmetic (the Neural Engine computes in float16 only)",
    "cpu-only-op": "an op the Neural Engine does not run (control flow, sorting, random, scatter)",
    "int16-gather": "gather indices cast to int16: token ids >= 32768 would wrap (uint16 is fine)",
}
CPU_ONLY_OPS = {"while_loop", "cond", "non_zero", "argsort", "topk", "random_uniform", "random_normal",
                "random_bernoulli", "random_categorical", "scatter", "scatter_nd", "scatter_along_axis"}
INDEX_OPS = {"shape", "range_1d", "gather", "cast", "slice_by_index", "concat", "fill", "expand_dims", "sub", "abs",
             "greater", "less", "add", "mul", "reshape", "squeeze", "select"}


class Readiness:
    """Collects the summary; `observe` plugs into the emulator to see real shapes at a real length."""

    def __init__(self, program_ops=()):
        self.op_counts = Counter()
        self.flags: dict[str, set] = {}
        self.largest = ("", "", (), 0)                       # (op name, op type, shape, elements)
        self.add_ops(program_ops)

    def add_ops(self, program_ops) -> None:
        """Count and check the ops of one program (call once per function of a multi-function package)."""
        program_ops = list(program_ops)
        self.op_counts.update(op.op_type for op in program_ops if op.op_type != "const")
        for op in program_ops:
            if op.op_type not in INDEX_OPS | {"const"} and any(o.dtype == types.fp32 for o in op.outputs):
                self.flag("float32-compute", f"{op.op_type} {op.name}")
            if op.op_type in CPU_ONLY_OPS:
                self.flag("cpu-only-op", f"{op.op_type} {op.name}")
            if op.op_type == "cast" and str(op.inputs.get("dtype").val if "dtype" in op.inputs else "") == "int16":
                tables = [c.inputs["x"].shape for o in op.outputs for c in o.child_ops if c.op_type == "gather"]
                if any(shape and max(shape) > 32767 for shape in tables):
                    self.flag("int16-gather", op.name)

    def flag(self, rule: str, where: str) -> None:
        self.flags.setdefault(rule, set()).add(where)

    def observe(self, op_name: str, op_type: str, value) -> None:
        value = np.asarray(value)
        if value.ndim > 4:
            self.flag("rank>4", f"{op_type} {op_name} {value.shape}")
        if value.ndim and max(value.shape) > ANE_MAX_AXIS:
            self.flag("axis>16384", f"{op_type} {op_name} {value.shape}")
        if value.size > self.largest[3]:
            self.largest = (op_name, op_type, value.shape, value.size)

    def report(self, package: Path, length: int, costs: dict | None = None) -> str:
        """The summary; costs: function label -> {length: package_cost.summarize()} adds FLOP and byte lines."""
        weights = sum(f.stat().st_size for f in (package / "Data").rglob("*") if f.is_file() and "weights" in f.parts)
        lines = [f"ANE readiness ({sum(self.op_counts.values())} ops):",
                 "  ops: " + ", ".join(f"{t} {n}" for t, n in sorted(self.op_counts.items(), key=lambda x: (-x[1], x[0])))]
        name, op_type, shape, size = self.largest
        if size:
            lines.append(f"  largest intermediate at {length} tokens: {op_type} {name} {tuple(shape)}, "
                         f"{size * 2 / 2**20:.1f} MiB in float16")
        lines.append(f"  weights on disk: {weights / 2**20:.1f} MiB")
        for label, by_length in (costs or {}).items():
            prefix = f"{label}: " if len(costs) > 1 else ""
            for n, summary in by_length.items():
                lines += ["  " + prefix + line for line in format_summary(n, summary)]
        if not self.flags:
            lines.append("  no op or shape known to push work off the Neural Engine")
        for rule, where in sorted(self.flags.items()):
            shown = sorted(where)
            more = f" (+{len(shown) - 3} more)" if len(shown) > 3 else ""
            lines.append(f"  WARNING [{rule}] {RULES[rule]}: {'; '.join(shown[:3])}{more}")
        return "\n".join(lines)
