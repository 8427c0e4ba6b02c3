"""modernbert_ane/cli.py: every flag of the four scripts is declared once, shared flags read the same everywhere,
and the shared output checks and progress lines behave."""
import ast
import json
from pathlib import Path

import pytest

from modernbert_ane import convert
from modernbert_ane import diff_coreml
from modernbert_ane import diff_torch
from modernbert_ane import predict
from modernbert_ane import cli
from modernbert_ane.user_errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"convert": convert, "predict": predict, "diff_torch": diff_torch, "diff_coreml": diff_coreml}
# the one name with two meanings: predict prints its results as JSON, the diff scripts write metrics to a file
TWO_MEANINGS = {"--json"}
# declared once with a parameter: convert takes several tasks and auto; what a function does and a report shows
PARAMETERIZED = {"--task", "--rotation", "--function", "--report", "--norm"}


def declared_flags(path: Path) -> list[str]:
    """The option strings of every add_argument call in a source file."""
    flags = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            flags += [a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("--")]
    return flags


def test_no_flag_is_declared_twice():
    files = [Path(m.__file__) for m in SCRIPTS.values()] + [Path(cli.__file__)]
    flags = [f for path in files for f in declared_flags(path)]
    repeated = {f for f in flags if flags.count(f) > 1} - TWO_MEANINGS
    assert not repeated
    assert len(flags) > 30                                           # the parse found the declarations


def actions(script) -> dict:
    return {opt: a for a in script.build_parser()._actions for opt in a.option_strings}


def test_shared_flags_read_the_same_in_every_script():
    seen = {}
    for name, script in SCRIPTS.items():
        for opt, action in actions(script).items():
            if opt in TWO_MEANINGS | PARAMETERIZED or opt in ("-h", "--help"):
                continue
            seen.setdefault(opt, {})[name] = (action.help, action.choices, action.default)
    shared = {opt: by_script for opt, by_script in seen.items() if len(by_script) > 1}
    assert {"--debug", "--allow-pickle", "--tokenizer", "--force", "--max-kl", "--compute-units"} <= set(shared)
    for opt, by_script in shared.items():
        assert len(set(map(repr, by_script.values()))) == 1, (opt, by_script)


def test_every_script_has_debug_and_the_runners_have_compute_units():
    for name, script in SCRIPTS.items():
        opts = actions(script)
        assert "--debug" in opts
        assert ("--compute-units" in opts) == (name in ("predict", "diff_coreml"))
    assert actions(convert)["--rotation"].default == "auto" and actions(diff_torch)["--rotation"].default == "hadamard"


def test_report_outputs_are_checked_before_the_work(tmp_path):
    args = diff_torch.build_parser().parse_args([str(tmp_path), "--json", str(tmp_path / "m.json")])
    (tmp_path / "m.json").write_text("{}")
    with pytest.raises(UserError, match="--force"):
        cli.check_report_outputs(args, [], "diff_torch")
    inside = diff_torch.build_parser().parse_args(["x", "--json", str(tmp_path / "ckpt" / "m.json")])
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(UserError):
        cli.check_report_outputs(inside, [tmp_path / "ckpt"], "diff_torch")


def test_write_json_replaces_only_its_own_kind(tmp_path):
    path = tmp_path / "m.json"
    cli.write_json(str(path), {"model": "a", "task": "fill-mask", "precision": "float32", "kl_mean": 1.0},
                   script="diff_torch")
    assert json.loads(path.read_text())["kl_mean"] == 1.0
    cli.write_json(str(path), {"model": "b", "task": "fill-mask", "precision": "float32"}, force=True,
                   script="diff_torch")
    assert json.loads(path.read_text())["model"] == "b"
    path.write_text(json.dumps({"something": "else"}))
    with pytest.raises(UserError):
        cli.write_json(str(path), {"model": "c", "task": "x", "precision": "float32"}, force=True, script="diff_torch")


def test_progress_numbers_the_steps_and_sums_them_by_verb(capsys):
    steps = cli.Progress(3)
    steps.start("loading x", announce="done")
    assert capsys.readouterr().err == ""                            # announced only once it worked
    steps.done()
    steps.start("fill-mask: tracing at 64 tokens")
    steps.done()
    steps.start("embed: tracing at 64 tokens")
    steps.done()
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "[1/3] loading x ..." and err[2] == "[2/3] fill-mask: tracing at 64 tokens ..."
    assert err[-2] == "[3/3] embed: tracing at 64 tokens ..." and err[-1].endswith(" s")
    assert [part.split()[0] for part in steps.summary().split(", ")] == ["loading", "tracing"]
