"""`pip install .` in a fresh virtual environment: one top-level name, working console scripts, the Python API.

The environment sees this machine's packages (--system-site-packages: torch and coremltools are not
downloaded again) and installs ours without dependencies or build isolation, so the test runs offline."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("install")
    source = tmp / "source"                                          # a copy: the build writes into its tree
    shutil.copytree(ROOT / "modernbert_ane", source / "modernbert_ane",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    env_dir = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(env_dir)], check=True)
    done = subprocess.run([str(env_dir / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-deps",
                           "--no-build-isolation", "--disable-pip-version-check", str(source)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return env_dir, tmp


def start(venv_dir: Path, cwd: Path, *cmd) -> subprocess.Popen:
    return subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                            env={"PATH": f"{venv_dir / 'bin'}:/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(cwd)})


def finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate()
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def run(venv_dir: Path, cwd: Path, *cmd):
    return finish(start(venv_dir, cwd, *cmd))


def test_installs_one_top_level_name(venv):
    env_dir, tmp = venv
    records = list(env_dir.glob("lib/python*/site-packages/modernbert_ane-*.dist-info/RECORD"))
    assert len(records) == 1
    tops = {line.split(",")[0].split("/")[0] for line in records[0].read_text().splitlines()}
    tops = {t for t in tops if not t.endswith(".dist-info") and t != ".."}    # ../../bin: the console scripts
    assert tops == {"modernbert_ane"}
    done = run(env_dir, tmp, env_dir / "bin" / "python", "-c", "import modernbert_ane.api as a; print(a.__file__)")
    assert done.returncode == 0 and "site-packages" in done.stdout, done.stderr[-1500:]


def test_console_scripts_and_api_work(venv, checkpoint_factory):
    env_dir, tmp = venv
    folder = checkpoint_factory("tiny", "fill-mask")
    package = tmp / "tiny.mlpackage"
    # processes that do not depend on each other run side by side (each spends seconds importing torch)
    converting = start(env_dir, tmp, env_dir / "bin" / "modernbert-ane-convert", folder, "-o", package, "--seq-len",
                       "32", "--rotation", "none", "--skip-check")
    scripts = ("convert", "predict", "diff-torch", "diff-coreml")
    helps = {script: start(env_dir, tmp, env_dir / "bin" / f"modernbert-ane-{script}", "--help") for script in scripts}
    for script, process in helps.items():
        done = finish(process)
        assert done.returncode == 0 and "usage:" in done.stdout, (script, done.stderr[-1500:])
    done = finish(converting)
    assert done.returncode == 0 and package.is_dir(), done.stderr[-2000:]
    refusing = start(env_dir, tmp, env_dir / "bin" / "modernbert-ane-convert", folder, "-o", package)
    code = ("from modernbert_ane.api import Predictor; import sys; "
            "print(Predictor(sys.argv[1], backend='emulate').fill_mask(['a [MASK] b'])[0][0][0]['token'])")
    predicting = start(env_dir, tmp, env_dir / "bin" / "python", "-c", code, package)
    done = finish(refusing)
    assert done.returncode == 2 and done.stderr.startswith("error:") and len(done.stderr.splitlines()) == 1
    done = finish(predicting)
    assert done.returncode == 0 and done.stdout.strip(), done.stderr[-2000:]
