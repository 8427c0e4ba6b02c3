"""output_files.py: outputs are renamed into place whole, replaced only with force, nothing left behind."""
import pytest

from output_files import publish, staging_folder
from user_errors import UserError


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
