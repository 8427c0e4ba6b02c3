"""MLProgramEmulator: one function of a package compiled to a flat plan of steps, run op by op."""
import os
from collections import Counter
from typing import Dict, List, Optional

import numpy as np

from .elementwise import to_int
from .errors import EmulationError, NotAnMLPackageError, UnsupportedOpError
from .loader import ARRAY_DTYPES, TUPLE_PARAMS, ProtoReader, read_package
from .numerics import F32, f16, f32
from .registry import MOVEMENT_OPS, OPS, Ctx

class _Step:
    __slots__ = ("op_type", "name", "fn", "params", "outs", "kinds", "skip_round", "free", "ctx")


class MLProgramEmulator:
    """Execute one function of an ML Program ``.mlpackage`` with NumPy in float16 storage.

    See the module docstring for the numerics and the pessimistic mode.
    """

    def __init__(self, package_path, function_name: str = "main", pessimistic: bool = False, spec=None):
        """spec: the package's parsed spec, when the caller has it (it is not parsed again)."""
        self.package_path = os.fspath(package_path)
        self.pessimistic = bool(pessimistic)
        spec, weights_dir = read_package(package_path, spec)
        self._spec = spec
        functions = spec.mlProgram.functions
        if function_name not in functions:
            default = getattr(spec.description, "defaultFunctionName", "")
            if function_name == "main" and default in functions:
                function_name = default
            else:
                raise ValueError(
                    f"function {function_name!r} not in {self.package_path} (has: {', '.join(sorted(functions))})"
                )
        self.function_name = function_name
        self._compile(functions[function_name], ProtoReader(weights_dir))
        self._specs_cache = self.input_specs()

    # ---- compile the op list into a flat execution plan ---------------------------------

    def _compile(self, func, reader: ProtoReader):
        if func.opset not in func.block_specializations:
            raise NotAnMLPackageError(f"function {self.function_name!r} has no block for opset {func.opset}")
        block = func.block_specializations[func.opset]
        ops = list(block.operations)
        self._op_type_counts = dict(Counter(op.type for op in ops))
        slot_of: Dict[str, int] = {}
        consts: Dict[str, object] = {}
        self.input_names: List[str] = []
        # op name -> parameter -> the names of the variables and constants it reads (e.g. a conv's weight
        # constant, whose name says which layer it is), for every op that runs
        self.op_inputs: Dict[str, Dict[str, List[str]]] = {}
        self._input_slots: Dict[str, int] = {}
        self._input_info = {}
        fp32_input_slots = set()
        for nvt in func.inputs:
            name = nvt.name
            dname, shape = reader.tensor_type(nvt.type)
            if shape is None:
                raise UnsupportedOpError(f"input '{name}' of type {dname} is not supported (stateful models)")
            kind = reader.kind(nvt.type, f"input '{name}'")
            s = len(slot_of)
            slot_of[name] = s
            self.input_names.append(name)
            self._input_slots[name] = s
            self._input_info[name] = (kind, dname == "FLOAT16", shape)
            if kind == "f" and dname != "FLOAT16":
                fp32_input_slots.add(s)

        def op_name(op, i):
            a = op.attributes.get("name")
            if a is not None:
                try:
                    return str(a.immediateValue.tensor.strings.values[0])
                except (IndexError, AttributeError):
                    pass
            return op.outputs[0].name if op.outputs else f"{op.type}_{i}"

        steps: List[_Step] = []
        for i, op in enumerate(ops):
            name = op_name(op, i)
            where = f"{op.type} op '{name}'"
            if len(op.blocks) or op.type in ("cond", "while_loop"):
                raise UnsupportedOpError(
                    f"unsupported op type '{op.type}' (op '{name}'): control flow / nested blocks are not emulated"
                )
            if op.type == "const":
                consts[op.outputs[0].name] = reader.value(op.attributes["val"], where)
                continue
            fn = OPS.get(op.type)
            if fn is None:
                raise UnsupportedOpError(f"unsupported op type '{op.type}' (op '{name}')")
            kinds = [reader.kind(o.type, where) for o in op.outputs]
            ctx = Ctx(self.pessimistic, name, op.type, len(op.outputs), kinds)
            params = []
            reads_fp32_input = False
            for pname, arg in op.inputs.items():
                refs = []
                for b in arg.arguments:
                    if b.WhichOneof("binding") == "name":
                        if b.name in consts:
                            refs.append((0, consts[b.name]))
                        elif b.name in slot_of:
                            refs.append((1, slot_of[b.name]))
                            reads_fp32_input |= slot_of[b.name] in fp32_input_slots
                        else:
                            raise NotAnMLPackageError(f"{where} reads '{b.name}' before it is defined")
                    else:
                        refs.append((0, reader.value(b.value, where)))
                if (op.type, pname) in TUPLE_PARAMS or len(refs) != 1:
                    params.append((pname, 2, refs))
                else:
                    params.append((pname, refs[0][0], refs[0][1]))
            if op.type.startswith("constexpr_"):
                # compile-time decompression: every input is a constant (iOS16 ops may carry
                # their parameters as attributes)
                args = {k: reader.value(v, where) for k, v in op.attributes.items() if k != "name"}
                for pname, kind, ref in params:
                    if kind == 1 or (kind == 2 and any(k == 1 for k, _ in ref)):
                        raise UnsupportedOpError(f"{where}: constexpr op with a non-constant input '{pname}'")
                    args[pname] = [r for _, r in ref] if kind == 2 else ref
                res = fn(args, ctx)
                res = res if isinstance(res, tuple) else (res,)
                for o, val, kind in zip(op.outputs, res, kinds):
                    consts[o.name] = f16(val) if kind == "f" else np.asarray(val, dtype=kind)
                continue
            st = _Step()
            st.op_type, st.name, st.fn, st.kinds, st.ctx = op.type, name, fn, kinds, ctx
            self.op_inputs[name] = {pname: [b.name for b in arg.arguments if b.WhichOneof("binding") == "name"]
                                    for pname, arg in op.inputs.items()}
            st.params = params
            st.skip_round = op.type in MOVEMENT_OPS and not reads_fp32_input
            st.outs = []
            for o in op.outputs:
                s = len(slot_of)
                slot_of[o.name] = s
                st.outs.append(s)
            steps.append(st)

        out_types = {o.name: o.type for op in ops for o in op.outputs}
        out_types.update({nvt.name: nvt.type for nvt in func.inputs})
        self.output_names: List[str] = list(block.outputs)
        self._outputs = []  # (name, kind, 0 -> const value | 1 -> slot, ref)
        keep = set()
        for oname in block.outputs:
            kind = reader.kind(out_types[oname], f"output '{oname}'") if oname in out_types else "f"
            if oname in consts:
                self._outputs.append((oname, kind, 0, consts[oname]))
            else:
                s = slot_of[oname]
                keep.add(s)
                self._outputs.append((oname, kind, 1, s))

        # last use of every slot: free it right after that step
        last_use: Dict[int, int] = {}
        for i, st in enumerate(steps):
            for _, kind, ref in st.params:
                if kind == 1:
                    last_use[ref] = i
                elif kind == 2:
                    for k2, r2 in ref:
                        if k2 == 1:
                            last_use[r2] = i
            for s in st.outs:  # outputs never read are freed right away
                last_use.setdefault(s, i)
        free_at: Dict[int, List[int]] = {}
        for s, i in last_use.items():
            if s not in keep:
                free_at.setdefault(i, []).append(s)
        for i, st in enumerate(steps):
            st.free = free_at.get(i, [])
        self._steps = steps
        self._n_slots = len(slot_of)


    # ---- public API ---------------------------------------------------------------------------

    def op_type_counts(self) -> Dict[str, int]:
        """Number of ops of each type in the function (const ops included)."""
        return dict(self._op_type_counts)

    def input_specs(self) -> Dict[str, dict]:
        """name -> {"dtype": numpy dtype, "shape": default shape (tuple),
        "enumerated_shapes": list of tuples or None, "shape_range": list of (lo, hi|None) or None},
        read from the package's model description."""
        desc = self._spec.description
        inputs = desc.input
        for f in getattr(desc, "functions", []):
            if f.name == self.function_name:
                inputs = f.input
        out = {}
        for fd in inputs:
            t = fd.type
            if t.WhichOneof("Type") != "multiArrayType":
                out[fd.name] = {"dtype": None, "shape": None, "enumerated_shapes": None, "shape_range": None,
                                "type": t.WhichOneof("Type")}
                continue
            ma = t.multiArrayType
            from coremltools.proto import FeatureTypes_pb2

            dname = FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(ma.dataType)
            info = {
                "dtype": np.dtype(ARRAY_DTYPES[dname]) if dname in ARRAY_DTYPES else None,
                "shape": tuple(int(d) for d in ma.shape),
                "enumerated_shapes": None,
                "shape_range": None,
            }
            flex = ma.WhichOneof("ShapeFlexibility")
            if flex == "enumeratedShapes":
                info["enumerated_shapes"] = [tuple(int(d) for d in s.shape) for s in ma.enumeratedShapes.shapes]
            elif flex == "shapeRange":
                info["shape_range"] = [
                    (int(r.lowerBound), None if r.upperBound < 0 else int(r.upperBound))
                    for r in ma.shapeRange.sizeRanges
                ]
            out[fd.name] = info
        return out

    def _prepare_inputs(self, inputs) -> Dict[str, np.ndarray]:
        if not isinstance(inputs, dict):
            raise ValueError("inputs must be a dict mapping input names to arrays")
        missing = [n for n in self.input_names if n not in inputs]
        extra = [n for n in inputs if n not in self._input_slots]
        if missing or extra:
            parts = []
            if missing:
                parts.append("missing inputs: " + ", ".join(missing))
            if extra:
                parts.append("unexpected inputs: " + ", ".join(map(str, extra)))
            raise ValueError("; ".join(parts) + f" (expected: {', '.join(self.input_names)})")
        specs = self._specs_cache
        prepared = {}
        bad = []
        for name in self.input_names:
            arr = np.asarray(inputs[name])
            shape = tuple(arr.shape)
            kind, is_fp16, var_shape = self._input_info[name]
            spec = specs.get(name)
            ok = len(shape) == len(var_shape) and all(d is None or d == s for d, s in zip(var_shape, shape))
            allowed = str(tuple("?" if d is None else d for d in var_shape))
            if ok and spec is not None and spec.get("shape") is not None:
                if spec["enumerated_shapes"]:
                    ok = shape in spec["enumerated_shapes"]
                    allowed = " or ".join(str(s) for s in spec["enumerated_shapes"])
                elif spec["shape_range"]:
                    ok = len(shape) == len(spec["shape_range"]) and all(
                        lo <= s and (hi is None or s <= hi) for s, (lo, hi) in zip(shape, spec["shape_range"])
                    )
                    allowed = str(spec["shape_range"])
                elif all(d is not None for d in var_shape):
                    ok = shape == spec["shape"]
                    allowed = str(spec["shape"])
            if not ok:
                bad.append(f"{name} has shape {shape}, allowed {allowed}")
                continue
            if kind == "f":
                if arr.dtype.kind not in "fiub":
                    bad.append(f"{name} must be numeric, got {arr.dtype}")
                    continue
                a = f16(arr) if is_fp16 else f32(arr)
            elif kind is not None and kind.kind == "b":
                a = arr.astype(bool)
            else:
                if arr.dtype.kind not in "fiub" or (
                    arr.dtype.kind == "f" and arr.size and not np.all(arr == np.trunc(arr))
                ):
                    bad.append(f"{name} must hold integers ({kind.name}), got {arr.dtype}")
                    continue
                ctx = Ctx(False, name, "input", 1, [kind])
                try:
                    a = to_int(arr, kind, ctx)
                except EmulationError as e:
                    bad.append(f"{name}: {str(e).split(': ', 1)[-1]}")
                    continue
            prepared[name] = a
        if bad:
            raise ValueError("bad inputs: " + "; ".join(bad))
        return prepared

    def predict(self, inputs: Dict[str, np.ndarray], observe=None) -> Dict[str, np.ndarray]:
        """Run the function. `observe(op_name, op_type, value)` is called after every
        (non-const) op with its float16-rounded output (a read-only float32 array for float
        outputs); ops with several outputs (split, topk, ...) call it once per output.

        Returns output name -> array (floats as float32 arrays of float16 values)."""
        prepared = self._prepare_inputs(inputs)
        env: List[Optional[object]] = [None] * self._n_slots
        for name, a in prepared.items():
            env[self._input_slots[name]] = a
        with np.errstate(all="ignore"):
            for st in self._steps:
                args = {}
                for pname, kind, ref in st.params:
                    if kind == 1:
                        args[pname] = env[ref]
                    elif kind == 0:
                        args[pname] = ref
                    else:
                        args[pname] = [env[r] if k == 1 else r for k, r in ref]
                res = st.fn(args, st.ctx)
                if len(st.outs) == 1:
                    res = (res,)
                elif not isinstance(res, tuple) or len(res) != len(st.outs):
                    raise AssertionError(f"{st.ctx.where()} returned the wrong number of outputs")
                for s, val, kind in zip(st.outs, res, st.kinds):
                    val = self._finish(val, kind, st)
                    env[s] = val
                    if observe is not None:
                        view = val.view() if isinstance(val, np.ndarray) else val
                        if isinstance(view, np.ndarray):
                            view.flags.writeable = False
                        observe(st.name, st.op_type, view)
                for s in st.free:
                    env[s] = None
        out = {}
        for name, kind, k, ref in self._outputs:
            v = env[ref] if k == 1 else ref
            out[name] = np.array(v, dtype=F32 if kind == "f" else None, copy=True)
        return out

    @staticmethod
    def _finish(val, kind, st):
        if kind == "f":
            a = np.asarray(val)
            if st.skip_round and a.dtype == F32:
                return a
            return f16(a)
        a = np.asarray(val)
        if kind is None or a.dtype == kind:
            return a
        if kind.kind == "b":
            return a.astype(bool)
        return to_int(a, kind, st.ctx)
