"""Running a package: `PackageRunner` is the one place that chooses between Core ML (macOS, coreml/macos.py) and
the float16 emulator (coreml/emulator/), so the macOS path stays thin.
"""
import platform
import sys

import numpy as np

from modernbert_ane.coreml.macos import DEFAULT_COMPUTE_UNITS, compute_unit, describe_load, load_coreml
from modernbert_ane.coreml.package import Package, PackageError
from modernbert_ane.user_errors import UserError

BACKENDS = ("auto", "coreml", "emulate")


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise UserError(f"unknown backend '{backend}' (one of {', '.join(BACKENDS)})")
    on_mac = sys.platform == "darwin"
    if backend == "coreml" and not on_mac:
        raise UserError(f"--backend coreml needs macOS (Core ML prediction does not exist on {platform.system()}); "
                        f"use --backend emulate")
    if backend == "auto":
        return "coreml" if on_mac else "emulate"
    return backend


def describe_backend(backend: str, compute_units: str | None = None, load_report: dict | None = None) -> str:
    """The backend in words, for stderr: 'Core ML (cpu-and-ne, loaded from the cache in 0.4 s ...)'."""
    if backend == "coreml":
        return f"Core ML ({compute_units}, {describe_load(load_report)})"
    return "float16 emulator"


class PackageRunner:
    """Loads a package once and runs it: Core ML on the Neural Engine (macOS) or the emulator. `function` may be
    a head of a `--shapes functions` package: each of its functions (one per length) is loaded, and `predict`
    runs the one of the input's length."""

    def __init__(self, package, backend: str = "auto", pessimistic: bool = False, function: str | None = None,
                 compute_units: str = DEFAULT_COMPUTE_UNITS, use_cache: bool = True):
        """package: a Package (read once by the caller) or a path."""
        self.backend = resolve_backend(backend)
        compute_unit(compute_units)                   # an unknown name: the same error on every OS
        self.package = Package.of(package)            # the clear error for a missing or foreign path, first
        self.path = self.package.path
        self.function = self.package.resolve(function)[0]
        self.functions = self.package.length_functions(self.function)             # length -> function
        self.compute_units, self.load_report, self._models = compute_units, None, {}
        named = bool(self.package.spec.description.functions)                     # a multi-function package
        try:
            for name in dict.fromkeys(reversed(self.functions.values())):          # the largest length's first
                if self.backend == "coreml":
                    model, report = load_coreml(self.path, compute_units, name if named else None, use_cache)
                    self.load_report = self.load_report or report                  # the first load: the compile
                else:
                    from modernbert_ane.coreml.emulator import MLProgramEmulator
                    model = MLProgramEmulator(str(self.path), function_name=name, pessimistic=pessimistic,
                                              spec=self.package.spec)
                self._models[name] = model
        except NotImplementedError:                   # an op the emulator lacks: its own message
            raise
        except (OSError, ValueError, RuntimeError) as e:  # the weights: missing, truncated, damaged
            raise PackageError(f"cannot load {self.path} (damaged? e.g. a truncated weight.bin): "
                               f"{type(e).__name__}: {e}") from e

    def op_inputs(self) -> dict:
        """op name -> parameter -> names read, for the ops `predict(observe=)` reports (emulator only; every
        function's)."""
        if self.backend != "emulate":
            return {}
        return {op: read for model in self._models.values() for op, read in model.op_inputs.items()}

    def model_for(self, length: int):
        """The loaded function that runs `length` tokens: a clear error for a length the package does not take."""
        if length not in self.functions:
            raise UserError(f"{self.path} takes no input of {length} tokens (it takes "
                            f"{', '.join(map(str, self.functions))})")
        return self._models[self.functions[length]]

    def describe(self) -> str:
        return describe_backend(self.backend, self.compute_units, self.load_report)

    def predict(self, inputs: dict, observe=None) -> dict:
        """inputs: name -> int32 array. observe(op_name, op_type, value) sees every op (emulator only)."""
        inputs = {k: np.ascontiguousarray(v, dtype=np.int32) for k, v in inputs.items()}
        model = self.model_for(inputs["input_ids"].shape[-1])
        if self.backend == "coreml":
            outputs = model.predict(inputs)
        else:
            outputs = model.predict(inputs, observe=observe)
        return {k: np.asarray(v, dtype=np.float32) for k, v in outputs.items()}
