"""bench/train_reference.py: deterministic for a seed, and a stopped-and-resumed run ends with the same bytes."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--corpus-files", "50", "--steps", "4", "--batch-size", "2", "--seq-len", "64", "--threads", "1",
         "--held-out-sequences", "4", "--save-every", "100"]


def train(tmp_path: Path, name: str, *extra: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "bench/train_reference.py", *SMALL, "--out", str(tmp_path / name),
                             "--work", str(tmp_path / f"{name}-work"), *extra],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def test_resumed_training_gives_the_same_checkpoint(tmp_path):
    straight = train(tmp_path, "a")
    assert "step 4/4" in straight.stdout and "unigram baseline" in straight.stdout
    stopped = train(tmp_path, "b", "--stop-after", "2")
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
