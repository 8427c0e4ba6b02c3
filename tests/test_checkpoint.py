"""checkpoint.py: confinement of the paths named inside a checkpoint, special files refused before they
are opened, config.json validated by type and range and against the safetensors headers before anything
is allocated, the memory estimate, non-finite weights, sentence-transformers prompts."""
import json
import os
import shutil
import struct
import time

import pytest

from modernbert_ane import checkpoint
from modernbert_ane.checkpoint import (CheckpointError, check_sizes, confined, read_prompts, resolve_checkpoint, safetensors_header,
                        validate_config)


@pytest.fixture
def ckpt(tmp_path, checkpoint_factory):
    return shutil.copytree(checkpoint_factory("tiny"), tmp_path / "ckpt")


def edit_config(folder, **values):
    config = json.loads((folder / "config.json").read_text())
    config.update(values)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("name", ["/etc/passwd", "../x", "a/../../x", "C:\\x", "a\\..\\..\\x", 3, None])
def test_confined_refuses_paths_that_leave(tmp_path, name):
    with pytest.raises(CheckpointError, match="leaves|is not a path"):
        confined(tmp_path, name, "shard")


def test_confined_follows_symlinks_but_allows_the_hub_cache(tmp_path):
    (tmp_path / "outside").write_text("x")
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "in").write_text("x")
    (folder / "link-in").symlink_to(folder / "in")
    (folder / "link-out").symlink_to(tmp_path / "outside")
    assert confined(folder, "link-in", "file") == folder / "link-in"
    with pytest.raises(CheckpointError, match="a link that leaves"):
        confined(folder, "link-out", "file")
    snapshot = tmp_path / "models--org--m" / "snapshots" / ("a" * 40)   # the hub cache links into ../../blobs
    (tmp_path / "models--org--m" / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (tmp_path / "models--org--m" / "blobs" / "abc").write_text("{}")
    (snapshot / "config.json").symlink_to(tmp_path / "models--org--m" / "blobs" / "abc")
    assert confined(snapshot, "config.json", "file") == snapshot / "config.json"


def test_a_fifo_is_refused_before_it_is_opened(ckpt):
    (ckpt / "config.json").unlink()
    os.mkfifo(ckpt / "config.json")
    start = time.monotonic()
    with pytest.raises(CheckpointError, match="not a regular file"):
        resolve_checkpoint(str(ckpt))
    assert time.monotonic() - start < 5                        # refused, not blocked on the open


GOOD = {"model_type": "modernbert", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2}


@pytest.mark.parametrize("values, message", [
    ({"hidden_size": 64.0}, "hidden_size 64.0 must be an integer"),
    ({"hidden_size": "64"}, "hidden_size \"64\" must be an integer"),
    ({"hidden_size": True}, "hidden_size true must be an integer"),
    ({"num_hidden_layers": 0}, "num_hidden_layers 0 must be an integer >= 1"),
    ({"vocab_size": -1}, "vocab_size -1"),
    ({"num_attention_heads": 3}, "does not split into 3 heads"),
    ({"num_attention_heads": 64}, "does not split into 64 heads of even size"),     # head_dim 1: RoPE needs pairs
    ({"local_attention": 1}, "local_attention 1 must be an integer >= 2"),
    ({"norm_eps": float("nan")}, "norm_eps NaN must be a positive number"),
    ({"global_rope_theta": -1.0}, "global_rope_theta"),
    ({"norm_bias": "no"}, "norm_bias \"no\" must be true or false"),
    ({"hidden_activation": 3}, "hidden_activation 3 must be a name"),
    ({"layer_types": ["full_attention"]}, "layer_types must list 2 entries"),
    ({"layer_types": ["full_attention", "chunked"]}, "layer_types must list 2 entries"),
    ({"id2label": {"0": "a", "2": "b"}}, "id2label keys must be 0..n-1"),
    ({"id2label": ["a", "b"]}, "id2label must be an object"),
    ({"id2label": {"0": "a"}, "num_labels": 2}, "num_labels 2 but id2label has 1"),
    ({"pad_token_id": -1}, "pad_token_id -1"),
])
def test_validate_config_by_type_and_range(values, message):
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(")):
        validate_config({**GOOD, **values}, "config.json")


def test_valid_configs_pass():
    validate_config(GOOD, "config.json")
    validate_config({**GOOD, "id2label": {"0": 0, "1": {"name": "x"}}, "norm_eps": 1e-5,
                     "layer_types": ["full_attention", "sliding_attention"]}, "config.json")


@pytest.mark.parametrize("values, message", [
    ({"num_hidden_layers": 10 ** 9}, "num_hidden_layers 1000000000, weights for 4 layers"),
    ({"vocab_size": 60_000_000}, "60000000 x 64"),
    ({"hidden_size": 128, "num_attention_heads": 4}, "128"),
    ({"intermediate_size": 10 ** 8}, "2 intermediate_size x hidden_size"),
])
def test_sizes_are_checked_against_the_headers_in_milliseconds(ckpt, values, message):
    edit_config(ckpt, layer_types=None, **values)             # legacy keys: layer_types would not list 10^9
    start = time.monotonic()
    with pytest.raises(CheckpointError, match=message):
        resolve_checkpoint(str(ckpt))
    assert time.monotonic() - start < 1.0


def test_a_checkpoint_that_cannot_fit_gets_an_estimate(ckpt, monkeypatch):
    monkeypatch.setattr(checkpoint, "memory_bytes", lambda: 1 << 20)          # a 1 MiB machine
    with pytest.raises(CheckpointError, match=r"parameters: loading them needs about 0\.\d GiB .* more than this "
                                              r"machine's 0\.0 GiB"):
        resolve_checkpoint(str(ckpt))
    monkeypatch.setattr(checkpoint, "memory_bytes", lambda: None)             # unknown: not refused
    resolve_checkpoint(str(ckpt))


def test_damaged_headers_are_refused_without_reading_the_claimed_size(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(struct.pack("<Q", 10 ** 15) + b"{}")         # a header "of a petabyte"
    with pytest.raises(CheckpointError, match="truncated or damaged"):
        safetensors_header(f)
    header = json.dumps({"w": {"dtype": "F32", "shape": [10 ** 9, 10 ** 9], "data_offsets": [0, 4 * 10 ** 18]}})
    f.write_bytes(struct.pack("<Q", len(header)) + header.encode())
    with pytest.raises(CheckpointError, match="places tensors up to byte"):
        safetensors_header(f)


def test_non_finite_weights_are_refused_with_their_name(ckpt):
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(ckpt / "model.safetensors"))
    tensors["model.layers.2.attn.Wo.weight"][1, 2] = float("-inf")
    save_file(tensors, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"weight model\.layers\.2\.attn\.Wo\.weight in .* non-finite"):
        checkpoint.load_state_dict(ckpt)


def test_input_paths_and_prompts_of_a_sentence_transformers_folder(tmp_path):
    from checkpoints import build_sentence_transformers
    folder = build_sentence_transformers(tmp_path / "st")
    ckpt = resolve_checkpoint(str(folder))
    assert set(ckpt.input_paths()) >= {folder.resolve(), folder.resolve() / "1_Pooling", folder.resolve() / "2_Dense"}
    assert read_prompts(folder) is None
    (folder / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": {"query": "search_query: ", "document": "search_document: "}, "default_prompt_name": None}))
    assert read_prompts(folder) == {"prompts": {"document": "search_document: ", "query": "search_query: "},
                                    "default": None}
    (folder / "config_sentence_transformers.json").write_text(json.dumps({"prompts": {"query": 3}}))
    with pytest.raises(CheckpointError, match="prompts must map names to texts"):
        read_prompts(folder)


def test_no_hadamard_is_said_before_any_work():
    with pytest.raises(CheckpointError, match="no Hadamard matrix of order 92.*--rotation random.*--rotation none"):
        checkpoint.check_rotation("hadamard", {"hidden_size": 92})
    checkpoint.check_rotation("random", {"hidden_size": 92})
    checkpoint.check_rotation("hadamard", {"hidden_size": 768})
