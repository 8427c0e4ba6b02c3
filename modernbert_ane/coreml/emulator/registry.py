"""The op table: each op module registers its functions with `register`; `Ctx` is what an op
knows about the op it runs; `MOVEMENT_OPS` are those whose outputs need no rounding."""
from typing import Callable, Dict, List

class Ctx:
    __slots__ = ("pessimistic", "op_name", "op_type", "n_out", "out_kinds")

    def __init__(self, pessimistic, op_name, op_type, n_out, out_kinds):
        self.pessimistic = pessimistic
        self.op_name = op_name
        self.op_type = op_type
        self.n_out = n_out
        self.out_kinds = out_kinds

    def where(self) -> str:
        return f"{self.op_type} op '{self.op_name}'"


OPS: Dict[str, Callable] = {}


def register(*names):
    def deco(fn):
        for n in names:
            OPS[n] = fn
        return fn

    return deco


def supported_op_types() -> List[str]:
    """Sorted op types the emulator can execute (plus ``const``)."""
    return sorted(set(OPS) | {"const"})




# Ops that only move/select float values: their float outputs are already float16 values
# when their inputs are, so rounding them again is skipped (pure speed optimization).
MOVEMENT_OPS = frozenset({
    "reshape", "expand_dims", "squeeze", "transpose", "tile", "concat", "stack", "split",
    "slice_by_index", "slice_by_size", "gather", "gather_nd", "gather_along_axis",
    "identity", "flatten2d", "reverse", "reshape_like", "select", "band_part",
    "maximum", "minimum", "relu", "clip", "threshold", "abs", "sliding_windows",
})
