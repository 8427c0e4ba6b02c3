"""bench/train_reference.py: deterministic for a seed, and a stopped-and-resumed run ends with the same bytes."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--corpus-files", "50", "--steps", "4", "--batch-size", "2", "--seq-len", "64", "--threads", "1",
         "--held-out-sequences", "4", "--save-every", "100"]


def start(tmp_path: Path, name: str, *extra: str) -> subprocess.Popen:
    """One run, started (--threads 1: two runs side by side use the two cores)."""
    return subprocess.Popen([sys.executable, "bench/train_reference.py", *SMALL, "--out", str(tmp_path / name),
                             "--work", str(tmp_path / f"{name}-work"), *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        stdout, stderr = process.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def train(tmp_path: Path, name: str, *extra: str) -> subprocess.CompletedProcess:
    return finish(start(tmp_path, name, *extra))


def test_resumed_training_gives_the_same_checkpoint(tmp_path):
    straight_run, stopped_run = start(tmp_path, "a"), start(tmp_path, "b", "--stop-after", "2")   # independent
    straight, stopped = finish(straight_run), finish(stopped_run)
    assert "step 4/4" in straight.stdout and "unigram baseline" in straight.stdout
    assert "stopped after step 2" in stopped.stdout and not (tmp_path / "b").exists()
    resumed = train(tmp_path, "b")
    assert "resumed from" in resumed.stdout and "at step 2" in resumed.stdout
    a, b = (tmp_path / "a" / "model.safetensors").read_bytes(), (tmp_path / "b" / "model.safetensors").read_bytes()
    assert a == b
    assert (tmp_path / "a" / "tokenizer.json").is_file() and (tmp_path / "a" / "NOTICE").is_file()


def test_training_state_of_other_options_is_refused(tmp_path):
    train(tmp_path, "c", "--stop-after", "2")
    result = subprocess.run([sys.executable, "bench/train_reference.py", *SMALL, "--lr", "1e-4",
                             "--out", str(tmp_path / "c"), "--work", str(tmp_path / "c-work")],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0 and "saved with other options" in result.stderr
