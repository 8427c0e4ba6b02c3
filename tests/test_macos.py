"""coreml/macos.py's Core ML path, on any OS: compute units, the compiled-model cache, the load logic (against a
recording stand-in for coremltools' macOS classes), --backend coreml off macOS, and the revision recorded in a
package's metadata (predict.py, diff_coreml.py, tokenizer loading; checkpoint.py's pickle-only hub message)."""
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from modernbert_ane import checkpoint
from modernbert_ane import diff_coreml
from modernbert_ane.coreml import macos, runner as package_runner
from modernbert_ane.coreml.package import METADATA_PREFIX, Package, package_inputs, tokenizer_revision
from modernbert_ane import predict
from modernbert_ane.coreml.quiet_coremltools import import_coremltools
from modernbert_ane.user_errors import UserError, run_cli

ROOT = Path(__file__).resolve().parent.parent
NOT_MAC = pytest.mark.skipif(sys.platform == "darwin", reason="checks the refusal off macOS")


# ----------------------------------------------------------------------------- compute units and arguments


def test_compute_units_map_to_coremltools_members():
    ct = import_coremltools()                                   # ComputeUnit exists on Linux too
    assert set(macos.COMPUTE_UNITS) == {"all", "cpu-and-ne", "cpu-and-gpu", "cpu-only"}
    assert macos.compute_unit("all") is ct.ComputeUnit.ALL
    assert macos.compute_unit("cpu-and-ne") is ct.ComputeUnit.CPU_AND_NE
    assert macos.compute_unit("cpu-and-gpu") is ct.ComputeUnit.CPU_AND_GPU
    assert macos.compute_unit("cpu-only") is ct.ComputeUnit.CPU_ONLY
    with pytest.raises(UserError, match="unknown compute units 'gpu'"):
        macos.compute_unit("gpu")


@pytest.mark.parametrize("parser", [predict.build_parser, diff_coreml.build_parser])
def test_runtime_arguments(parser):
    args = parser().parse_args(["x.mlpackage"])
    assert args.compute_units == "cpu-and-ne" and args.no_cache is False
    args = parser().parse_args(["x.mlpackage", "--compute-units", "cpu-only", "--no-cache"])
    assert args.compute_units == "cpu-only" and args.no_cache is True
    with pytest.raises(SystemExit) as e:
        parser().parse_args(["x.mlpackage", "--compute-units", "gpu"])
    assert e.value.code == 2


# ----------------------------------------------------------------------------- the cache


def make_package(folder: Path) -> Path:
    (folder / "Data" / "com.apple.CoreML" / "weights").mkdir(parents=True)
    (folder / "Manifest.json").write_text("{}")
    (folder / "Data" / "com.apple.CoreML" / "model.mlmodel").write_bytes(b"spec")
    (folder / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").write_bytes(b"\0" * 1000)
    return folder


def test_package_hash_is_stable_and_follows_the_content(tmp_path):
    a = make_package(tmp_path / "a.mlpackage")
    key = macos.package_hash(a)
    assert macos.package_hash(a) == key and len(key) == 64
    b = tmp_path / "elsewhere" / "b.mlpackage"
    shutil.copytree(a, b)
    assert macos.package_hash(b) == key                     # the bytes, not where they lie
    (b / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").write_bytes(b"\0" * 999 + b"\1")
    assert macos.package_hash(b) != key                     # one changed byte
    shutil.rmtree(b)
    shutil.copytree(a, b)
    (b / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").rename(b / "Data" / "com.apple.CoreML" / "weights" / "w.bin")
    assert macos.package_hash(b) != key                     # a renamed file


def test_cache_dir_honours_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert macos.cache_dir("darwin") == tmp_path / "xdg" / "modernbert-ane"
    assert macos.cache_dir("linux") == tmp_path / "xdg" / "modernbert-ane"
    package = make_package(tmp_path / "p.mlpackage")
    assert macos.compiled_path(package) == tmp_path / "xdg" / "modernbert-ane" / (
        macos.package_hash(package) + ".mlmodelc")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")       # ignored, as the XDG spec says
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert macos.cache_dir("darwin") == tmp_path / "home" / "Library" / "Caches" / "modernbert-ane"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert macos.cache_dir("linux") == tmp_path / "home" / ".cache" / "modernbert-ane"


class RecordingCoreML:
    """Records what load_coreml asks of coremltools' macOS-only classes (absent on Linux); ComputeUnit is the
    real one."""

    def __init__(self):
        self.calls, real = [], import_coremltools()
        self.ComputeUnit = real.ComputeUnit
        self.utils = SimpleNamespace(compile_model=self.compile_model)
        self.models = SimpleNamespace(MLModel=self.model("MLModel"), CompiledMLModel=self.model("CompiledMLModel"))

    def compile_model(self, source, destination):
        self.calls.append(("compile", source, destination))
        Path(destination).mkdir()
        (Path(destination) / "model.mil").write_text("compiled")
        return destination

    def model(self, kind):
        def load(path, compute_units, **named):
            self.calls.append((kind, path, compute_units, named))
            return kind
        return load


def test_load_compiles_once_then_reuses_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    fake = RecordingCoreML()
    monkeypatch.setattr(macos, "import_coremltools", lambda: fake)
    package = make_package(tmp_path / "p.mlpackage")
    target = macos.compiled_path(package)

    model, report = macos.load_coreml(package, "cpu-only")
    assert report["cache"] == "miss" and report["compiled_path"] == str(target) and target.is_dir()
    assert [c[0] for c in fake.calls] == ["compile", "CompiledMLModel"]
    assert fake.calls[1] == ("CompiledMLModel", str(target), fake.ComputeUnit.CPU_ONLY, {})
    assert not [p for p in target.parent.iterdir() if p != target]   # no staging folder left behind

    fake.calls.clear()
    model, report = macos.load_coreml(package, "cpu-and-ne", function="embed")
    assert report["cache"] == "hit" and report["compile_s"] == 0.0
    assert fake.calls == [("CompiledMLModel", str(target), fake.ComputeUnit.CPU_AND_NE, {"function_name": "embed"})]

    fake.calls.clear()
    model, report = macos.load_coreml(package, "all", use_cache=False)
    assert report["cache"] == "off" and model == "MLModel"
    assert fake.calls == [("MLModel", str(package), fake.ComputeUnit.ALL, {})]
    assert "--no-cache" in macos.describe_load(report)

    (package / "Data" / "com.apple.CoreML" / "model.mlmodel").write_bytes(b"another spec")
    fake.calls.clear()
    assert macos.load_coreml(package)[1]["cache"] == "miss"      # a changed package is compiled again
    assert fake.calls[0][0] == "compile"


CORE_ML_NAMES = {"MLModel", "CompiledMLModel", "compile_model", "MLComputePlan"}   # coremltools' macOS-only paths
CORE_ML_FUNCTIONS = {"compile_package", "load_coreml", "compute_plan_records"}


def core_ml_uses(source: str) -> set[str]:
    """The functions of a module that name one of coremltools' macOS-only classes or functions ('<module>' for
    module level)."""
    import ast
    uses = set()

    def visit(node, where):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            where = node.name
        named = (node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else
                 None)
        imported = [a.name for a in node.names] if isinstance(node, (ast.Import, ast.ImportFrom)) else []
        if named in CORE_ML_NAMES or CORE_ML_NAMES & set(imported):
            uses.add(where)
        for child in ast.iter_child_nodes(node):
            visit(child, where)

    visit(ast.parse(source), "<module>")
    return uses


def test_every_core_ml_call_sits_behind_one_function():
    """Compiling, loading and the compute plan each happen in one function of coreml/macos.py; every script reaches
    Core ML through them (PackageRunner, bench_device.py's measure_*), so Linux tests cover everything else."""
    found = {}
    for path in sorted(p for p in ROOT.rglob("*.py") if "tests" not in p.relative_to(ROOT).parts):
        uses = core_ml_uses(path.read_text())
        if uses:
            found[path.relative_to(ROOT).as_posix()] = uses
    assert found == {"modernbert_ane/coreml/macos.py": CORE_ML_FUNCTIONS}
    assert core_ml_uses("def f(ct):\n    return ct.models.MLModel('x')\n") == {"f"}          # the check can fail


@NOT_MAC
@pytest.mark.parametrize("script,argv", [
    ("predict.py", ["missing.mlpackage", "text", "--backend", "coreml"]),
    ("diff_coreml.py", ["missing.mlpackage", "--backend", "coreml", "--compute-units", "cpu-only"]),
    ("bench/bench_device.py", ["missing.mlpackage"]),
])
def test_core_ml_is_refused_off_macos_in_one_line(script, argv, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / script), *argv], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "macOS" in lines[0], result.stderr
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- revisions


def test_tokenizer_revision_is_the_conversions_commit_for_the_checkpoints_own_tokenizer():
    commit = "0123456789abcdef0123456789abcdef01234567"
    assert tokenizer_revision({"source": "org/model", "tokenizer": "org/model", "revision": commit}) == commit
    assert tokenizer_revision({"source": "org/model", "tokenizer": "org/other", "revision": commit}) is None
    assert tokenizer_revision({"source": "/ckpt", "tokenizer": "/ckpt", "revision": None}) is None


def test_load_tokenizer_passes_the_revision(checkpoint_factory, monkeypatch):
    import transformers
    folder, seen = checkpoint_factory("tiny"), []
    real = transformers.AutoTokenizer.from_pretrained

    def from_pretrained(name, **kwargs):
        seen.append((name, kwargs))
        return real(str(folder))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", from_pretrained)
    checkpoint.load_tokenizer("org/model", revision="abc123")
    checkpoint.load_tokenizer("org/model")
    assert seen == [("org/model", {"revision": "abc123"}), ("org/model", {})]


@pytest.fixture(scope="module")
def hub_package(checkpoint_factory, tmp_path_factory):
    """A tiny package whose metadata says it came from a hub repository at a commit."""
    from modernbert_ane import convert
    out = tmp_path_factory.mktemp("hub") / "hub.mlpackage"
    with pytest.raises(SystemExit) as e:
        run_cli(convert.main, [str(checkpoint_factory("tiny")), "--seq-len", "32", "--skip-check", "-o", str(out)])
    assert e.value.code == 0
    package = Package(out)
    stored = package.spec.description.metadata.userDefined
    meta = {k[len(METADATA_PREFIX):]: json.loads(v) for k, v in stored.items()
            if k.startswith(METADATA_PREFIX)}
    meta.update(source="org/model", tokenizer="org/model", revision="c" * 40)
    package.write_metadata(meta)
    package.save()
    return out


class Stop(UserError):
    pass


def test_predict_loads_the_tokenizer_at_the_recorded_revision(hub_package, monkeypatch, capsys):
    seen = []

    def load_tokenizer(source, tasks=(), revision=None):
        seen.append((source, revision))
        raise Stop("stop here")
    monkeypatch.setattr(predict, "load_tokenizer", load_tokenizer)
    with pytest.raises(SystemExit):
        run_cli(predict.main, [str(hub_package), "a [MASK] text", "--backend", "emulate"])
    with pytest.raises(SystemExit):
        run_cli(predict.main, [str(hub_package), "a [MASK] text", "--backend", "emulate", "--tokenizer", "org/other"])
    assert seen == [("org/model", "c" * 40), ("org/other", None)]


def test_diff_coreml_compares_against_the_recorded_revision(hub_package, monkeypatch, capsys):
    seen = []

    def resolve_checkpoint(source, revision=None, allow_pickle=False):
        seen.append((source, revision))
        raise Stop("stop here")
    monkeypatch.setattr(diff_coreml, "resolve_checkpoint", resolve_checkpoint)
    with pytest.raises(SystemExit):
        run_cli(diff_coreml.main, [str(hub_package), "--backend", "emulate"])
    with pytest.raises(SystemExit):
        run_cli(diff_coreml.main, [str(hub_package), "--backend", "emulate", "--model", "org/model"])
    assert seen == [("org/model", "c" * 40), ("org/model", None)]


def test_pickle_only_hub_repository_is_told_about_allow_pickle(tmp_path, monkeypatch):
    import huggingface_hub
    snapshot = tmp_path / ("d" * 40)
    snapshot.mkdir()
    (snapshot / "config.json").write_text('{"model_type": "modernbert"}')   # the .bin is not downloaded
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: str(snapshot))
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo, revision=None: ["config.json",
                                                                                         "pytorch_model.bin"])
    with pytest.raises(checkpoint.CheckpointError, match="--allow-pickle to load them safely"):
        checkpoint.resolve_checkpoint("org/embedder")

    def offline(*a, **k):
        raise OSError("offline")
    monkeypatch.setattr(huggingface_hub, "list_repo_files", offline)   # cannot ask: the usual check says it
    with pytest.raises(checkpoint.CheckpointError, match="has no .safetensors weights"):
        checkpoint.resolve_checkpoint("org/embedder")


@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML runs only on macOS")
def test_core_ml_agrees_with_the_emulator_and_reuses_its_compiled_copy(hub_package, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    ids = list(range(5, 25))
    inputs = package_inputs([ids], 32, 0)
    emulated = package_runner.PackageRunner(hub_package, "emulate").predict(inputs)["logits"][0, :len(ids)]
    for units, cache in (("cpu-only", "miss"), ("cpu-and-ne", "hit")):
        runner = package_runner.PackageRunner(hub_package, "coreml", compute_units=units)
        assert runner.load_report["cache"] == cache
        ours = runner.predict(inputs)["logits"][0, :len(ids)]
        assert (ours.argmax(-1) == emulated.argmax(-1)).mean() >= 0.95, units
