"""output_files.py: outputs are renamed into place whole, replaced only with force and only when ours, never
over a special file or symlink, never inside an input or holding one; nothing left behind (SIGTERM included)."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from modernbert_ane.output_files import Ours, check_output, json_with_keys, publish, rename_new, staging_folder, write_file
from modernbert_ane.user_errors import UserError, run_cli

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_publish_replaces_only_with_force_and_leaves_nothing(tmp_path, kind):
    target = tmp_path / "out"
    for version in ("one", "two"):
        with staging_folder(target) as staging:
            staged = staging / "built"
            if kind == "file":
                staged.write_text(version)
            else:
                staged.mkdir()
                (staged / "data").write_text(version)
            if version == "two":
                with pytest.raises(UserError, match="pass --force"):
                    publish(staged, target, force=False)
            publish(staged, target, force=True)
        assert (target.read_text() if kind == "file" else (target / "data").read_text()) == version
        assert [p.name for p in tmp_path.iterdir()] == ["out"]          # no staging, no .out.old-PID


def test_staging_folder_is_removed_on_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with staging_folder(tmp_path / "out") as staging:
            (staging / "half-written").write_text("x")
            raise RuntimeError("conversion failed")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- the rules, before the work

def test_special_files_and_symlinks_are_refused_with_or_without_force(tmp_path):
    import socket
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    os.mkfifo(tmp_path / "fifo")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "sock"))
    cases = {"link": "symbolic link", "dangling": "symbolic link", "fifo": "FIFO", "sock": "socket"}
    for name, kind in cases.items():
        for force in (False, True):
            with pytest.raises(UserError, match=kind):
                check_output(tmp_path / name, force, folder=True)
    with pytest.raises(UserError, match="a device"):
        check_output(os.devnull, True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling", "fifo", "link", "real", "sock"]


def test_force_replaces_only_what_is_ours(tmp_path):
    ours = Ours(lambda p: (p / "ours").exists(), "one of ours")
    target = tmp_path / "out"
    target.mkdir()
    with pytest.raises(UserError, match="exists; pass --force"):
        check_output(target, False, folder=True, ours=ours)
    with pytest.raises(UserError, match="is not one of ours; --force replaces only one of ours"):
        check_output(target, True, folder=True, ours=ours)
    (target / "ours").write_text("")
    assert check_output(target, True, folder=True, ours=ours) == target
    with pytest.raises(UserError, match="is a folder"):
        check_output(target, True)


def test_json_of_the_same_kind(tmp_path):
    ours = json_with_keys(("model", "task"), "a report")
    f = tmp_path / "m.json"
    for text, expected in (('{"model": 1, "task": 2, "x": 3}', True), ('{"model": 1}', False), ("[1]", False),
                           ("not json", False)):
        f.write_text(text)
        assert ours.test(f) is expected, text
    assert not ours.test(tmp_path)


@pytest.mark.parametrize("where", ["inside", "holding"])
def test_no_output_is_inside_an_input_or_holds_one(tmp_path, where):
    ckpt = tmp_path / "ckpt"
    (ckpt / "sub").mkdir(parents=True)
    (tmp_path / "alias").symlink_to(ckpt)                      # compared resolved: a link does not hide it
    if where == "inside":
        for out in (ckpt / "x.json", ckpt / "sub" / "x.json", tmp_path / "alias" / "x.json", ckpt):
            with pytest.raises(UserError, match="is inside the input"):
                check_output(out, True, inputs=[None, "org/hub-id", ckpt], folder=True)
    else:
        with pytest.raises(UserError, match="would contain the input"):
            check_output(tmp_path, True, inputs=[ckpt / "sub"], folder=True)
    check_output(tmp_path / "elsewhere.json", False, inputs=[ckpt])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alias", "ckpt"]     # the probe left nothing


def test_unwritable_or_full_folder_is_found_before_the_work(tmp_path, monkeypatch):
    import errno
    import tempfile

    def fail(err):
        def mkstemp(*a, **k):
            raise OSError(err, os.strerror(err))
        return mkstemp
    monkeypatch.setattr(tempfile, "mkstemp", fail(errno.EACCES))
    with pytest.raises(UserError, match="is not writable"):
        check_output(tmp_path / "out.json", False)
    monkeypatch.setattr(tempfile, "mkstemp", fail(errno.ENOSPC))
    with pytest.raises(UserError, match="no space left to write"):
        check_output(tmp_path / "out.json", False)
    with pytest.raises(UserError, match="does not exist"):
        check_output(tmp_path / "no" / "out.json", False)


# ----------------------------------------------------------------------------- at the rename

def test_a_target_that_appeared_during_the_work_is_kept(tmp_path):
    target = tmp_path / "m.json"
    check_output(target, False)
    target.write_text("appeared")                              # while the work ran
    with pytest.raises(UserError, match="appeared while it was being written"):
        write_file(target, b"{}", force=False)
    assert target.read_text() == "appeared"
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]  # no temporary left
    ours = json_with_keys(("model",), "a report")
    with pytest.raises(UserError, match="is not a report"):
        write_file(target, b"{}", force=True, ours=ours)
    target.write_text('{"model": 1}')
    write_file(target, b'{"model": 2}', force=True, ours=ours)
    assert target.read_text() == '{"model": 2}'


def test_a_special_file_that_appeared_is_never_replaced(tmp_path):
    target = tmp_path / "out"
    with staging_folder(target) as staging:
        (staging / "built").mkdir()
        os.mkfifo(target)
        with pytest.raises(UserError, match="FIFO"):
            publish(staging / "built", target, force=True)
    assert target.is_fifo()


def test_rename_new_never_replaces(tmp_path):
    (tmp_path / "a").write_text("a")
    (tmp_path / "b").write_text("b")
    with pytest.raises(FileExistsError):
        rename_new(tmp_path / "a", tmp_path / "b")
    (tmp_path / "d").mkdir()                                   # an empty folder: os.rename would replace it
    with pytest.raises(FileExistsError):
        rename_new(tmp_path / "a", tmp_path / "d")
    rename_new(tmp_path / "a", tmp_path / "c")
    assert (tmp_path / "c").read_text() == "a" and (tmp_path / "b").read_text() == "b"


SLOW_WRITER = r'''
import sys
import time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from modernbert_ane.output_files import staging_folder
from modernbert_ane.user_errors import run_cli

def main(argv):
    with staging_folder(Path(argv[0])) as staging:
        (staging / "half-written").write_text("x")
        print("staged", flush=True)
        time.sleep(60)
run_cli(main, sys.argv[2:])
'''


@pytest.mark.parametrize("sig, code, message", [(signal.SIGTERM, 143, "error: terminated"),
                                                (signal.SIGINT, 130, "error: interrupted")])
def test_sigterm_cleans_up_like_sigint(tmp_path, sig, code, message):
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(ROOT), str(tmp_path / "out")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "staged\n"
    assert len(list(tmp_path.iterdir())) == 1                   # the staging folder
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == code and err.strip() == message, err
    assert list(tmp_path.iterdir()) == []


def test_run_cli_puts_the_callers_sigterm_handler_back():
    """CLIs run in process (the tests) leave the process's own SIGTERM behaviour as it was."""
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit):
        run_cli(lambda argv: 0, [])
    assert signal.getsignal(signal.SIGTERM) is before
