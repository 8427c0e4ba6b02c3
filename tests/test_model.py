"""model.py against transformers' ModernBERT, and checkpoint loading through the user's code path."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from modernbert_ane.checkpoint import CheckpointError, resolve_checkpoint
from checkpoints import CONFIGS, TASK_CLASSES, _trained_tokenizer_json, build_sentence_transformers, build_tokenizer
from modernbert_ane.evaluation import EVAL_TEXTS, reference_model, sentence_embeddings, tokenize
from modernbert_ane.model import (MASK_FILL, NORM_KINDS, ActivationProbe, LayerNorm, ModernBert, ModernBertConfig, RMSNorm,
                                  default_task, local_attention_bytes)

TOL = 1e-4


def reference_and_ours(folder, task, input_ids, attention_mask, chunk=None):
    model, ckpt = ModernBert.from_pretrained(str(folder), task=task)
    if chunk:
        model.set_query_chunk(chunk)
    ref = reference_model(ckpt, task)
    with torch.no_grad():
        out = ref(input_ids=input_ids, attention_mask=attention_mask)
        ref_out = out.last_hidden_state if task == "encoder" else out.logits
        ours = model(input_ids, attention_mask)
    if task == "classify":
        ours = ours[:, 0]                                          # (B, K=1, L) -> transformers' (B, L)
    return ref_out, ours


def batch(max_length=512, texts=EVAL_TEXTS):
    return tokenize(build_tokenizer(), texts, max_length)


def masked_max_diff(a, b, mask):
    return (a - b)[mask.bool()].abs().max().item()


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("legacy", [False, True], ids=["layer_types", "legacy"])
def test_fill_mask_parity_with_padding_and_long_texts(checkpoint_factory, config, legacy):
    folder = checkpoint_factory(config, "fill-mask", legacy_config=legacy)
    ids, mask = batch()
    window = CONFIGS[config]["local_attention"]
    assert ids.shape[1] > 4 * window and (mask == 0).any()        # longer than the window, and padded
    ref, ours = reference_and_ours(folder, "fill-mask", ids, mask)
    assert masked_max_diff(ref, ours, mask) <= TOL
    assert (ref.argmax(-1) == ours.argmax(-1))[mask.bool()].all()


def test_short_sequence_shorter_than_window(checkpoint_factory):
    folder = checkpoint_factory("odd", "fill-mask")
    ids, mask = batch(texts=EVAL_TEXTS[:3])
    assert ids.shape[1] < CONFIGS["odd"]["local_attention"]
    ref, ours = reference_and_ours(folder, "fill-mask", ids, mask)
    assert masked_max_diff(ref, ours, mask) <= TOL


@pytest.mark.parametrize("task", ["encoder", "classify", "token-classify"])
def test_other_heads_parity(checkpoint_factory, task):
    folder = checkpoint_factory("biased", task)
    ids, mask = batch()
    ref, ours = reference_and_ours(folder, task, ids, mask)
    if task == "classify":
        assert (ref - ours).abs().max().item() <= TOL
    else:
        assert masked_max_diff(ref, ours, mask) <= TOL


def test_mean_pooling_classifier(checkpoint_factory):
    folder = checkpoint_factory("tiny", "classify", config_overrides={"classifier_pooling": "mean"})
    ids, mask = batch()
    ref, ours = reference_and_ours(folder, "classify", ids, mask)
    assert (ref - ours).abs().max().item() <= TOL


def test_query_chunking_is_exact(checkpoint_factory):
    folder = checkpoint_factory("tiny", "fill-mask")
    ids, mask = batch()
    ref, ours = reference_and_ours(folder, "fill-mask", ids, mask, chunk=64)
    assert masked_max_diff(ref, ours, mask) <= TOL


def test_sliding_window_matters(checkpoint_factory):
    """Guards the local mask: dropping it must change the output of a text longer than the window."""
    folder = checkpoint_factory("tiny", "fill-mask")
    model, _ = ModernBert.from_pretrained(str(folder))
    ids, mask = batch(texts=EVAL_TEXTS[6:7])
    with torch.no_grad():
        windowed = model(ids, mask)
        model.config.local_attention = 10 ** 6
        unwindowed = model(ids, mask)
    assert (windowed - unwindowed).abs().max() > 1e-2


def test_masks_are_float16_safe(checkpoint_factory):
    model, _ = ModernBert.from_pretrained(str(checkpoint_factory("tiny", "fill-mask")))
    mask = torch.tensor([[1] * 12 + [0] * 12])                     # longer than the window, half padding
    g, l = model.mask_biases(mask, torch.float16)
    assert torch.isfinite(g).all() and torch.isfinite(l).all()
    assert g.min() == MASK_FILL and l.min() == 2 * MASK_FILL     # a padded key outside the window: still finite
    out = model.half()(torch.randint(5, 100, (1, 24)), mask.half())
    assert torch.isfinite(out).all()


def test_config_formats_agree(checkpoint_factory):
    new = ModernBertConfig.from_dict(json.loads((checkpoint_factory("biased") / "config.json").read_text()))
    old = ModernBertConfig.from_dict(json.loads(
        (checkpoint_factory("biased", legacy_config=True) / "config.json").read_text()))
    assert new == old
    assert new.layer_types == ("full_attention", "sliding_attention", "full_attention")
    assert new.norm_bias and new.attention_bias and new.mlp_bias and new.classifier_bias
    assert (new.hidden_size, new.num_attention_heads, new.head_dim, new.local_attention) == (64, 2, 32, 8)


def test_released_base_config_reads_without_guessing():
    cfg = ModernBertConfig.from_dict({"model_type": "modernbert", "hidden_size": 1024, "intermediate_size": 2624,
                                      "num_hidden_layers": 28, "num_attention_heads": 16,
                                      "global_attn_every_n_layers": 3, "global_rope_theta": 160000.0,
                                      "local_rope_theta": 10000.0, "architectures": ["ModernBertForMaskedLM"]})
    assert cfg.layer_types.count("full_attention") == 10 and cfg.head_dim == 64
    assert default_task(cfg) == "fill-mask"


@pytest.mark.parametrize("task", sorted(TASK_CLASSES))
def test_default_task_from_architectures(checkpoint_factory, task):
    model, _ = ModernBert.from_pretrained(str(checkpoint_factory("tiny", task)))
    assert model.task == task


def test_bare_encoder_keys_and_head_keys_of_other_tasks(checkpoint_factory):
    # ModernBertModel: bare keys; a MaskedLM checkpoint converts as an encoder (its head is known, unused)
    bare = load_file(str(checkpoint_factory("tiny", "encoder") / "model.safetensors"))
    assert not any(k.startswith("model.") for k in bare)
    ModernBert.from_pretrained(str(checkpoint_factory("tiny", "fill-mask")), task="encoder")


def test_encoder_checkpoint_has_no_fill_mask_head(checkpoint_factory):
    with pytest.raises(CheckpointError, match="missing .*head.dense.weight"):
        ModernBert.from_pretrained(str(checkpoint_factory("tiny", "encoder")), task="fill-mask")


def test_tied_decoder_falls_back_to_embeddings(checkpoint_factory):
    tensors = load_file(str(checkpoint_factory("tiny", "fill-mask") / "model.safetensors"))
    assert "decoder.weight" not in tensors          # save_pretrained drops the tied weight
    model, _ = ModernBert.from_pretrained(str(checkpoint_factory("tiny", "fill-mask")))
    assert torch.equal(model.decoder.weight[:, :, 0, 0], model.embeddings.tok_embeddings.weight)


def test_tied_decoder_gathers_from_the_decoder_weight(checkpoint_factory, monkeypatch):
    """A tied checkpoint's embeddings read the decoder's (V, C, 1, 1) weight (one constant in the package)
    and compute what nn.Embedding computes; a rotation keeps the tie; an untied decoder is its own."""
    from modernbert_ane.rotations import rotate_model
    model, _ = ModernBert.from_pretrained(str(checkpoint_factory("tiny", "fill-mask")))
    ids, mask = batch(48, EVAL_TEXTS[:2])
    tables, forward = [], model.embeddings.forward
    monkeypatch.setattr(model.embeddings, "forward", lambda i, table=None: tables.append(table) or forward(i, table))
    with torch.no_grad():
        model(ids, mask)
        h_tied, _ = forward(ids, model.decoder.weight)
        h_own, _ = forward(ids)
        expected = model.embeddings.norm(model.embeddings.tok_embeddings(ids).transpose(1, 2).unsqueeze(2))
    assert model.tied_decoder and tables == [model.decoder.weight]
    assert torch.equal(h_tied, expected) and torch.equal(h_own, expected)     # (B, C, 1, S), the same lookup
    rotate_model(model, "hadamard", 0)
    assert model.tied_decoder                          # rotations/ leave the table and the decoder unrotated
    untied = checkpoint_factory("tiny", "fill-mask", config_overrides={"tie_word_embeddings": False})
    assert "decoder.weight" in load_file(str(untied / "model.safetensors"))
    assert not ModernBert.from_pretrained(str(untied))[0].tied_decoder
    assert not ModernBert.from_pretrained(str(checkpoint_factory("tiny", "fill-mask")), task="encoder")[0].tied_decoder


def test_sharded_safetensors(checkpoint_factory, tmp_path):
    source = checkpoint_factory("tiny", "fill-mask")
    folder = tmp_path / "sharded"
    shutil.copytree(source, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate([names[:half], names[half:]]):
        shard = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: tensors[k].contiguous() for k in part}, str(folder / shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    ids, mask = batch(texts=EVAL_TEXTS[:2])
    ref, ours = reference_and_ours(folder, "fill-mask", ids, mask)
    assert masked_max_diff(ref, ours, mask) <= TOL


@pytest.mark.parametrize("pooling,dense,normalize", [("mean", 32, True), ("cls", None, False)])
def test_sentence_transformers_folder(tmp_path, pooling, dense, normalize):
    """Embeddings follow sentence-transformers' semantics: pooling, Dense, Normalize."""
    folder = build_sentence_transformers(tmp_path / "st", "biased", pooling, dense, normalize)
    ckpt = resolve_checkpoint(str(folder))
    assert ckpt.is_sentence_transformers and ckpt.path == folder
    model, _ = ModernBert.from_pretrained(str(folder))
    assert model.task == "embed"
    ids, mask = batch()
    ref_model = reference_model(ckpt, "embed")
    with torch.no_grad():
        ref = sentence_embeddings(ckpt, ref_model(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
        ours = model(ids, mask)[:, 0]                              # (B, K=1, D)
    assert ours.shape == (len(EVAL_TEXTS), dense or 64)
    assert (ref - ours).abs().max() <= TOL
    if normalize:
        assert torch.allclose(ours.norm(dim=1), torch.ones(len(EVAL_TEXTS)), atol=1e-5)


def test_unknown_and_missing_keys_are_named(checkpoint_factory, tmp_path):
    folder = tmp_path / "bad"
    shutil.copytree(checkpoint_factory("tiny", "fill-mask"), folder)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["model.layers.0.attn_norm.weight"] = torch.ones(64)     # layer 0 has no attention norm
    del tensors["model.layers.2.mlp.Wo.weight"]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as e:
        ModernBert.from_pretrained(str(folder))
    assert "model.layers.0.attn_norm.weight" in str(e.value) and "model.layers.2.mlp.Wo.weight" in str(e.value)


def test_wrong_shape_is_named(checkpoint_factory, tmp_path):
    folder = tmp_path / "shape"
    shutil.copytree(checkpoint_factory("tiny", "fill-mask"), folder)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["model.layers.1.mlp.Wi.weight"] = torch.zeros(10, 64)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.Wi.weight"):
        ModernBert.from_pretrained(str(folder))


def test_truncated_safetensors(checkpoint_factory, tmp_path):
    folder = tmp_path / "truncated"
    shutil.copytree(checkpoint_factory("tiny", "fill-mask"), folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or damaged"):
        ModernBert.from_pretrained(str(folder))


def test_other_model_type(checkpoint_factory, tmp_path):
    folder = tmp_path / "bert"
    shutil.copytree(checkpoint_factory("tiny", "fill-mask"), folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "bert"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="'bert' model; only 'modernbert'"):
        ModernBert.from_pretrained(str(folder))


def test_missing_path_and_offline_hub():
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        resolve_checkpoint("./does/not/exist")
    with pytest.raises(CheckpointError, match="cannot download 'answerdotai/ModernBERT-base'.*local checkpoint folder"):
        resolve_checkpoint("answerdotai/ModernBERT-base")


def pack(tokenizer, texts):
    """One row holding every text, attention_mask = segment ids (1..K), then padding."""
    rows = [tokenizer(t)["input_ids"] for t in texts]
    ids = sum(rows, [])
    seg = sum(([k + 1] * len(r) for k, r in enumerate(rows)), [])
    pad = 8
    return (torch.tensor([ids + [tokenizer.pad_token_id] * pad]), torch.tensor([seg + [0] * pad]),
            [len(r) for r in rows])


@pytest.mark.parametrize("task", ["fill-mask", "token-classify", "classify", "embed"])
def test_packed_texts_equal_separate_runs(checkpoint_factory, tmp_path, task):
    """Positions restart per text, attention is block-diagonal (the sliding window included: texts
    are longer than the window, so windows reach across segment borders), pooling is per text."""
    if task == "embed":
        folder = build_sentence_transformers(tmp_path / "st", "tiny", "mean", 32, True)
    else:
        folder = checkpoint_factory("tiny", task, config_overrides={"classifier_pooling": "mean"})
    texts = [EVAL_TEXTS[2], EVAL_TEXTS[3], EVAL_TEXTS[4]]
    tokenizer = build_tokenizer()
    ids, seg, lengths = pack(tokenizer, texts)
    assert min(lengths) > CONFIGS["tiny"]["local_attention"]
    packed_model, _ = ModernBert.from_pretrained(str(folder), max_texts=4)
    single_model, _ = ModernBert.from_pretrained(str(folder))
    with torch.no_grad():
        packed = packed_model(ids, seg)
        start = 0
        for k, (text, n) in enumerate(zip(texts, lengths)):
            one_ids, one_mask = tokenize(tokenizer, [text], 512)
            alone = single_model(one_ids, one_mask)
            if task in ("classify", "embed"):
                assert (packed[0, k] - alone[0, 0]).abs().max() <= TOL
            else:
                assert (packed[0, start:start + n] - alone[0]).abs().max() <= TOL
            start += n
        if task in ("classify", "embed"):
            assert torch.isfinite(packed).all()                     # the unused 4th slot too


@pytest.mark.parametrize("config", ["tiny", "biased"])
def test_blockwise_local_attention_is_exact(checkpoint_factory, config):
    """O(S * window) local layers: same outputs as transformers, with padding, at many windows' length."""
    folder = checkpoint_factory(config, "fill-mask")
    b = CONFIGS[config]["local_attention"] // 2
    texts = [EVAL_TEXTS[6], EVAL_TEXTS[0], EVAL_TEXTS[7]]
    ids, mask = tokenize(build_tokenizer(), texts, 320, fixed_length=True)
    assert 320 % b == 0 and mask.sum(1).min() < 320                  # a multiple of the block, padded rows
    model, ckpt = ModernBert.from_pretrained(str(folder))
    model.set_local_attention("blockwise")
    with torch.no_grad():
        ours = model(ids, mask)
        ref = reference_model(ckpt, "fill-mask")(input_ids=ids, attention_mask=mask).logits
    assert masked_max_diff(ref, ours, mask) <= TOL


def test_local_attention_bytes_by_hand():
    """S=4, C=8, H=2, b=2: masked 3 H S^2 + 6 C S = 96 + 192 elements; blockwise 9 H b S + 35 C S + 8 C b =
    144 + 1120 + 128; two bytes each. Quadratic against linear: the S x S form loses beyond a crossover."""
    assert local_attention_bytes("masked", 4, 8, 2, 2) == 2 * (96 + 192)
    assert local_attention_bytes("blockwise", 4, 8, 2, 2) == 2 * (144 + 1120 + 128)
    base = dict(hidden=768, heads=12, radius=64)
    masked_wins = [n for n in range(64, 8193, 64)
                   if local_attention_bytes("masked", n, **base) <= local_attention_bytes("blockwise", n, **base)]
    assert masked_wins == list(range(64, 769, 64))                   # blockwise from 832 tokens at base size
    with pytest.raises(ValueError, match="unknown local attention"):
        local_attention_bytes("dense", 4, 8, 2, 2)


def test_blockwise_local_attention_with_packing(checkpoint_factory):
    folder = checkpoint_factory("tiny", "fill-mask")
    tokenizer = build_tokenizer()
    ids, seg, lengths = pack(tokenizer, [EVAL_TEXTS[2], EVAL_TEXTS[3], EVAL_TEXTS[4]])
    extra = -ids.shape[1] % 8                                        # whole blocks of 8, padding at the end
    ids = torch.nn.functional.pad(ids, (0, extra), value=tokenizer.pad_token_id)
    seg = torch.nn.functional.pad(seg, (0, extra))
    masked, _ = ModernBert.from_pretrained(str(folder), max_texts=4)
    blockwise, _ = ModernBert.from_pretrained(str(folder), max_texts=4)
    blockwise.set_local_attention("blockwise")
    with torch.no_grad():
        a, b = masked(ids, seg), blockwise(ids, seg)
    assert (a - b)[seg > 0].abs().max() <= TOL


def test_pickle_weights_need_allow_pickle(checkpoint_factory, tmp_path):
    folder = tmp_path / "pickle"
    shutil.copytree(checkpoint_factory("tiny", "fill-mask"), folder)
    tensors = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(tensors, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        ModernBert.from_pretrained(str(folder))
    model, _ = ModernBert.from_pretrained(str(folder), allow_pickle=True)
    reference, _ = ModernBert.from_pretrained(str(checkpoint_factory("tiny", "fill-mask")))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


def test_pickle_with_code_is_refused(checkpoint_factory, tmp_path):
    """weights_only=True: a pickle that would run code is an error, not an execution."""
    folder = tmp_path / "evil"
    shutil.copytree(checkpoint_factory("tiny", "fill-mask"), folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    torch.save({"x": Evil()}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="a pickle holding more than tensors"):
        ModernBert.from_pretrained(str(folder), allow_pickle=True)
    assert not marker.exists()


def test_test_tokenizer_is_the_same_in_every_process():
    """The test checkpoints' vocabulary (and so every test model) does not depend on the process: tokenizers'
    own trainer gave each process another one (hash-map order), which made thresholds flicker."""
    tests = Path(__file__).resolve().parent
    code = "import sys; sys.path[:0] = sys.argv[1:]; from checkpoints import _trained_tokenizer_json as t; print(t())"
    env = {**os.environ, "PYTHONHASHSEED": "4321"}
    other = subprocess.run([sys.executable, "-c", code, str(tests), str(tests.parent)], capture_output=True,
                           text=True, env=env, check=True).stdout.strip()
    assert other == _trained_tokenizer_json()
    assert len(json.loads(other)["model"]["vocab"]) == 600


# ----------------------------------------------------------------------------- norm forms (model.NORM_KINDS)

def massive_input(dtype=torch.float64):
    """(2, 64, 1, 8): ordinary tokens, and three tokens with ~3e4 on three channels (their sum > 65504)."""
    x = torch.randn(2, 64, 1, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x[:, 5, :, :3], x[:, 17, :, :3], x[:, 9, :, :3] = 3e4, 2.9e4, 3e4
    return x.to(dtype)


@pytest.mark.parametrize("kind", NORM_KINDS)
def test_every_norm_form_is_layer_norm_in_float64(kind):
    x = massive_input()
    norm = LayerNorm(64, 1e-5, True, "n", kind).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.1, 0.1)
        ref = torch.nn.functional.layer_norm(x.transpose(1, 3), (64,), norm.weight, norm.bias, 1e-5).transpose(1, 3)
        assert (norm(x) - ref).abs().max() < 1e-9
        rms = x / (x.pow(2).mean(1, keepdim=True) + 1e-5).sqrt()
        assert (RMSNorm(1e-5, "r", kind)(x) - rms).abs().max() < 1e-9


def test_safe_norms_survive_float16_where_fused_overflows():
    x = massive_input()
    ref = torch.nn.functional.layer_norm(x.transpose(1, 3), (64,), eps=1e-5).transpose(1, 3)
    outputs = {}
    for kind in NORM_KINDS:
        with ActivationProbe() as probe, torch.no_grad():
            outputs[kind] = LayerNorm(64, 1e-5, False, "n", kind).half()(x.half()).double()
        outputs[kind + ".overflow"] = probe.overflow_count
    assert outputs["fused.overflow"] > 0 and outputs["l2eps.overflow"] > 0    # squares / their sum beyond 65504
    assert outputs["safe.overflow"] == 0 and (outputs["safe"] - ref).abs().max() < 1e-2
    assert (outputs["fused"] - ref).abs().max() > 1                          # the overflow ruins the massive tokens


@pytest.mark.parametrize("module", [lambda: LayerNorm(64, 1e-5, False, "n", "safe"), lambda: RMSNorm(1e-5, "n")])
def test_safe_norms_scale_by_max_abs_itself(module):
    """A massive value beyond 32752 (a trained model's MLP plant reaches 3.4e4): any multiple of max|x| (the
    LayerNorm once divided by 2 max|x|) overflows float16 and NaNs the token, then everything attending to it."""
    x = massive_input()
    x[:, 5, :, :3] = 3.4e4
    norm = module()
    centred = x - x.mean(1, keepdim=True) if isinstance(norm, LayerNorm) else x       # (2, 64, 1, 8)
    ref = centred / (centred.pow(2).mean(1, keepdim=True) + 1e-5).sqrt()
    with ActivationProbe() as probe, torch.no_grad():
        out = norm.half()(x.half()).double()
    assert probe.overflow_count == 0 and (out - ref).abs().max() < 1e-2


@pytest.mark.parametrize("module", [lambda: LayerNorm(64, 1e-5, False, "n", "safe"), lambda: RMSNorm(1e-5, "r")])
def test_safe_norms_are_clamp_free_and_zero_safe(module):
    """A clamp inside a norm hit a Neural Engine bug in a peer port: the safe forms have none, and a token of
    zeros still gives zeros (no 0/0)."""
    norm = module()
    graph = str(torch.jit.trace(norm, massive_input(torch.float32)).graph)
    assert "clamp" not in graph and "aten::max" not in graph.replace("aten::amax", "")
    with torch.no_grad():
        out = norm.half()(torch.zeros(1, 64, 1, 3, dtype=torch.float16))
    assert torch.equal(out, torch.zeros_like(out))


def test_small_components_beside_a_massive_value_keep_their_precision():
    """The safe RMSNorm scales x itself, not x / max|x|: beside 3e4, |x| / 3e4 would be a float16 subnormal."""
    x = massive_input()
    ref = x / (x.pow(2).mean(1, keepdim=True) + 1e-5).sqrt()
    out = RMSNorm(1e-5, "r")(x.half()).double()
    small = ((x.abs() > 0.5) & (x.abs() < 10))[:, :, :, :3]               # ordinary components of massive tokens,
                                                                           # large enough for a normal float16 output
    rel = ((out - ref).abs() / ref.abs().clamp(min=1e-12))[:, :, :, :3][small]
    assert rel.max() < 3e-3                                                # a few float16 roundings, not lost bits


def test_set_norm_keeps_the_function(checkpoint_factory):
    folder = checkpoint_factory("biased", "fill-mask")
    model = ModernBert.from_pretrained(str(folder))[0]
    ids, mask = tokenize(build_tokenizer(), EVAL_TEXTS, 512)
    with torch.no_grad():
        before = model(ids, mask)
        for kind in ("safe", "l2eps"):
            model.set_norm(kind)
            assert all(m.kind == kind for m in model.modules() if isinstance(m, LayerNorm))
            assert (model(ids, mask) - before)[mask.bool()].abs().max() < 1e-4
    with pytest.raises(ValueError, match="unknown norm"):
        model.set_norm("clamped")
