import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]
os.environ.setdefault("HF_HUB_OFFLINE", "1")          # tests never touch a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from checkpoints import build_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """checkpoint_factory(config="tiny", task="fill-mask", **options) -> folder, built once per session."""
    built = {}

    def make(config="tiny", task="fill-mask", **options):
        key = (config, task, repr(sorted(options.items())))
        if key not in built:
            name = f"{config}-{task}-{len(built)}"
            folder = tmp_path_factory.mktemp("ckpt") / name
            build_checkpoint(folder, config, task, **options)
            built[key] = folder
        return built[key]

    return make
