"""coreml/package.py: `Package` reads a package once and answers everything about it (functions, heads, lengths,
metadata); a prediction or a diff parses a package's spec exactly once; reading changes nothing; metadata written
through it reads back."""
import hashlib

import pytest

from modernbert_ane import diff_coreml, predict
from modernbert_ane.coreml import package as package_module
from modernbert_ane.coreml.emulator import interpreter
from modernbert_ane.coreml.package import Package, PackageError, read_metadata
from modernbert_ane.user_errors import run_cli


@pytest.fixture(scope="module")
def functions_package(checkpoint_factory, tmp_path_factory):
    """A tiny fill-mask package with one function per length (--shapes functions), and its checkpoint."""
    from modernbert_ane import convert
    folder = checkpoint_factory("tiny")
    out = tmp_path_factory.mktemp("functions") / "f.mlpackage"
    with pytest.raises(SystemExit) as e:
        run_cli(convert.main, [str(folder), "--seq-len", "32", "64", "--shapes", "functions", "--rotation", "none",
                               "--skip-check", "-o", str(out)])
    assert e.value.code == 0
    return out, folder


def file_hashes(folder) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_functions_heads_and_lengths(functions_package):
    path, _ = functions_package
    package = Package(path)
    assert set(package.function_names) == {"fill_mask_32", "fill_mask_64"}
    assert package.heads() == {"fill_mask": package.function_names}
    assert package.resolve() == ("fill_mask", package.function_names)              # the default's head
    assert package.resolve("fill_mask_32") == ("fill_mask_32", ["fill_mask_32"])
    assert package.length_functions() == {32: "fill_mask_32", 64: "fill_mask_64"}
    assert package.lengths() == [32, 64] and package.lengths("fill_mask_64") == [64]
    assert [f.name for f in package.description("fill_mask_32").input] == ["input_ids", "attention_mask"]
    with pytest.raises(PackageError, match="has no function 'embed' \\(it has fill_mask, fill_mask_"):
        package.resolve("embed")


def test_metadata_merges_the_functions_entry(functions_package):
    path, folder = functions_package
    package = Package(path)
    meta = package.metadata()
    assert (meta["task"], meta["function"], meta["seq_lengths"]) == ("fill-mask", "fill_mask", [32, 64])
    assert meta["length_functions"] == {32: "fill_mask_32", 64: "fill_mask_64"} and meta["source"] == str(folder)
    assert sorted(meta["cost"]) == ["32", "64"]                                       # both lengths' counts
    one = package.metadata("fill_mask_32")
    assert (one["function"], one["seq_lengths"], sorted(one["cost"])) == ("fill_mask_32", [32], ["32"])
    assert read_metadata(path) == meta


def test_reading_changes_nothing_and_written_metadata_reads_back(functions_package, tmp_path):
    import shutil
    path, _ = functions_package
    before = file_hashes(path)
    Package(path).metadata()
    predict.Predictor(path, backend="emulate").fill_mask(["a [MASK] text"])
    assert file_hashes(path) == before                   # coremltools' load_spec would rewrite Manifest.json
    copy = tmp_path / "copy.mlpackage"
    shutil.copytree(path, copy)
    package = Package(copy)
    meta = {k: v for k, v in package.metadata().items() if k not in ("function", "function_names", "length_functions")}
    package.write_metadata({**meta, "labels": ["x"]})
    package.save()
    changed = file_hashes(copy)
    assert read_metadata(copy)["labels"] == ["x"]
    assert {k for k in before if before[k] != changed[k]} == {"Data/com.apple.CoreML/model.mlmodel"}   # weights kept


@pytest.fixture
def parse_counts(monkeypatch):
    """How many times a package's spec is parsed: by Package, and by the emulator without a spec handed to it."""
    counts = {"package": 0, "emulator": 0}
    parse, read = package_module.parse_spec, interpreter.read_package

    def counted_parse(path, file):
        counts["package"] += 1
        return parse(path, file)

    def counted_read(path, spec=None):
        counts["emulator"] += spec is None
        return read(path, spec)
    monkeypatch.setattr(package_module, "parse_spec", counted_parse)
    monkeypatch.setattr(interpreter, "read_package", counted_read)
    return counts


def test_a_prediction_parses_the_package_once(functions_package, parse_counts):
    """Metadata, lengths and both functions' emulators come from one parse (it was five before `Package`)."""
    path, _ = functions_package
    predictor = predict.Predictor(path, backend="emulate")
    assert predictor.lengths == [32, 64]
    predictor.fill_mask(["a [MASK] text", "a longer [MASK] text " + "word " * 12])
    predictor.fill_mask(["again a [MASK]"])
    assert predictor.runner.functions == {32: "fill_mask_32", 64: "fill_mask_64"}
    assert parse_counts == {"package": 1, "emulator": 0}


def test_a_diff_parses_the_package_once(functions_package, parse_counts, capsys):
    path, folder = functions_package
    with pytest.raises(SystemExit) as e:
        run_cli(diff_coreml.main, [str(path), "--backend", "emulate", "--model", str(folder)])
    assert e.value.code == 0, capsys.readouterr().err
    assert parse_counts == {"package": 1, "emulator": 0}


def test_a_path_that_is_not_a_package(tmp_path):
    with pytest.raises(PackageError, match="no such package"):
        Package(tmp_path / "missing.mlpackage")
    (tmp_path / "folder.mlpackage").mkdir()
    with pytest.raises(PackageError, match="is not an .mlpackage \\(no Manifest.json\\)"):
        Package(tmp_path / "folder.mlpackage")
