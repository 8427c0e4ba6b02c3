"""coreml/runner.py: the backend chosen per OS, and PackageRunner loading a `--shapes functions` head's functions
and running each input with the function of its length (Core ML through test_macos.py's recording stand-in)."""
import json
import sys
from pathlib import Path

import pytest

from modernbert_ane.coreml import macos, runner as package_runner
from modernbert_ane.coreml.package import Package, package_inputs, read_metadata
from modernbert_ane.coreml.quiet_coremltools import import_coremltools
from modernbert_ane.user_errors import UserError
from test_macos import RecordingCoreML, make_package


def test_backend_per_os(monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    assert package_runner.resolve_backend("auto") == "emulate" and package_runner.resolve_backend("emulate") == "emulate"
    with pytest.raises(UserError, match="--backend coreml needs macOS"):
        package_runner.resolve_backend("coreml")
    with pytest.raises(UserError, match="unknown backend 'gpu'"):
        package_runner.resolve_backend("gpu")
    monkeypatch.setattr(sys, "platform", "darwin")
    assert package_runner.resolve_backend("auto") == "coreml" and package_runner.resolve_backend("coreml") == "coreml"
    assert package_runner.describe_backend("emulate") == "float16 emulator"


def functions_package(folder: Path) -> Path:
    """A package laid out as `convert.py --shapes functions --seq-len 32 64` lays it out (a spec only, no program):
    functions fill_mask_32 and fill_mask_64, the larger the default, and their heads in the metadata."""
    import_coremltools()
    from coremltools.proto import Model_pb2
    spec = Model_pb2.Model()
    spec.description.defaultFunctionName = "fill_mask_64"
    functions = {}
    for n in (32, 64):
        function = spec.description.functions.add(name=f"fill_mask_{n}")
        for name in ("input_ids", "attention_mask"):
            feature = function.input.add(name=name)
            feature.type.multiArrayType.shape.extend([1, n])
        functions[f"fill_mask_{n}"] = {"task": "fill-mask", "output": "logits", "head": "fill_mask", "seq_lengths": [n]}
    make_package(folder)
    (folder / "Manifest.json").write_text(json.dumps({"itemInfoEntries": {"A": {"path": "com.apple.CoreML/model.mlmodel"}},
                                                      "rootModelIdentifier": "A"}))
    (folder / "Data" / "com.apple.CoreML" / "model.mlmodel").write_bytes(spec.SerializeToString())
    package = Package(folder)
    package.write_metadata({"shapes": "functions", "seq_lengths": [32, 64], "functions": functions})
    package.save()
    return folder


def test_core_ml_path_runs_the_function_of_the_inputs_length(tmp_path, monkeypatch):
    """--shapes functions on macOS: PackageRunner loads each function of the head from the one compiled copy and
    predicts with the one of the input's length (recorded through the stand-in for coremltools)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    fake, predicted = RecordingCoreML(), []

    class Loaded:
        def __init__(self, path, compute_units, function_name):
            self.function = function_name

        def predict(self, inputs):
            predicted.append((self.function, inputs["input_ids"].shape))
            return {"logits": inputs["input_ids"][..., None].astype("float32")}

    fake.models.CompiledMLModel = Loaded
    monkeypatch.setattr(macos, "import_coremltools", lambda: fake)
    monkeypatch.setattr(package_runner, "resolve_backend", lambda backend: "coreml")
    package = functions_package(tmp_path / "f.mlpackage")
    meta = read_metadata(package)
    assert (meta["function"], meta["seq_lengths"]) == ("fill_mask", [32, 64])
    assert meta["length_functions"] == {32: "fill_mask_32", 64: "fill_mask_64"}
    runner = package_runner.PackageRunner(package, "coreml", function=meta["function"], compute_units="cpu-only")
    assert [c[0] for c in fake.calls] == ["compile"]                           # one compile for both functions
    assert runner.load_report["cache"] == "miss" and sorted(runner._models) == ["fill_mask_32", "fill_mask_64"]
    for n in (32, 64, 32):
        runner.predict(package_inputs([[1, 2, 3]], n, 0))
    assert predicted == [("fill_mask_32", (1, 32)), ("fill_mask_64", (1, 64)), ("fill_mask_32", (1, 32))]
    with pytest.raises(UserError, match="takes no input of 48 tokens"):
        runner.predict(package_inputs([[1, 2, 3]], 48, 0))
    only = package_runner.PackageRunner(package, "coreml", function="fill_mask_32")
    assert list(only._models) == ["fill_mask_32"] and only.functions == {32: "fill_mask_32"}
