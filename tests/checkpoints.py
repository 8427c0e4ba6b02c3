"""Small random ModernBERT checkpoints, built with transformers' own classes and saved the way a
user's checkpoint is, with a tokenizer trained on the fly. No model hub is touched.

Random init leaves every norm weight at 1 and bias at 0, and near-uniform logits: `perturb` moves
the norms and biases (so a norm bug shows) and the initializer range is raised (so top-1 is not noise).
`plant_outliers` (the embedding norm makes them) and `plant_mlp_outliers` (a GeGLU unit of layer 1 writes
them) give a checkpoint the massive activations trained ModernBERTs have; `plant_checkpoint` applies either
to any saved checkpoint folder (`python tests/checkpoints.py plant SRC DST --outliers mlp`).
"""
import collections
import functools
import json
from pathlib import Path

import torch

from modernbert_ane.evaluation import EVAL_TEXTS
from modernbert_ane.tasks import SPECS

SPECIAL_TOKENS = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]

# name -> transformers ModernBertConfig arguments. Windows are smaller than the evaluation texts.
CONFIGS = {
    # head_dim 16, global every 3rd layer, no biases
    "tiny": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                 global_attn_every_n_layers=3, local_attention=16),
    # head_dim 32, global every 2nd layer, every bias on
    "biased": dict(hidden_size=64, intermediate_size=80, num_hidden_layers=3, num_attention_heads=2,
                   global_attn_every_n_layers=2, local_attention=8, norm_bias=True, attention_bias=True,
                   mlp_bias=True, classifier_bias=True),
    # hidden 48 = 12 * 4 (not a power of two: a Paley Hadamard), head_dim 16, tanh GELU
    "odd": dict(hidden_size=48, intermediate_size=72, num_hidden_layers=3, num_attention_heads=3,
                global_attn_every_n_layers=3, local_attention=32, norm_bias=True,
                hidden_activation="gelu_pytorch_tanh"),
}

# ModernBERT-base's dimensions and vocabulary size, for the benchmarks only (too slow for tests), with
# transformers' default initializer range: at 0.1 and 22 layers of width 768 the random network is
# chaotic (a float16 rounding anywhere flips later attention), which no trained model is
BENCH_CONFIGS = {
    "base": dict(hidden_size=768, intermediate_size=1152, num_hidden_layers=22, num_attention_heads=12,
                 global_attn_every_n_layers=3, local_attention=128, vocab_size=50368, initializer_range=0.02),
}


# the planted-outlier checkpoints the float16 targets are measured on (tests/test_convert.py, bench/):
# wider than "tiny" and with transformers' default initializer range, so float16's own floor (confident
# random logits, ~4e-7 KL on "tiny") sits below the targets and what a float16 strategy costs shows
OUTLIER_CONFIGS = {
    "small": dict(hidden_size=128, intermediate_size=192, num_hidden_layers=4, num_attention_heads=4,
                  global_attn_every_n_layers=3, local_attention=16, initializer_range=0.02),
}


def training_corpus() -> list[str]:
    words = " ".join(EVAL_TEXTS).replace("[MASK]", "").split()
    extra = [" ".join(words[i:i + 12]) for i in range(0, len(words), 7)]
    return list(EVAL_TEXTS) + extra


def wordpiece_vocab(normalizer, pre_tokenizer, corpus: list[str], size: int = 600) -> dict[str, int]:
    """A WordPiece vocabulary of `size` tokens learnt from `corpus` the way tokenizers' WordPieceTrainer
    learns one (start from the characters, "##" marking a word's inner ones, and merge the most frequent
    adjacent pair until the vocabulary is full), with ties broken alphabetically. The trainer itself is not
    used: its tie-breaking follows a hash map's iteration order, so each process learnt another vocabulary
    (huggingface/tokenizers#1794) and every test checkpoint was a different model from run to run."""
    counts = collections.Counter(word for text in corpus
                                 for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    splits = {word: [word[0]] + ["##" + ch for ch in word[1:]] for word in sorted(counts)}
    vocab = SPECIAL_TOKENS + sorted({piece for pieces in splits.values() for piece in pieces})
    while len(vocab) < size:
        pairs = collections.Counter()
        for word, pieces in splits.items():
            for pair in zip(pieces, pieces[1:]):
                pairs[pair] += counts[word]
        if not pairs:
            break
        (left, right), _ = min(pairs.items(), key=lambda item: (-item[1], item[0]))
        merged = left + right[2:]                           # right is an inner piece: drop its "##"
        for word, pieces in splits.items():
            i = 0
            while i < len(pieces) - 1:
                if pieces[i] == left and pieces[i + 1] == right:
                    pieces[i:i + 2] = [merged]
                i += 1
        vocab.append(merged)
    return {token: i for i, token in enumerate(dict.fromkeys(vocab))}


@functools.lru_cache(maxsize=1)
def _trained_tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    tok = Tokenizer(models.WordPiece(wordpiece_vocab(normalizer, pre_tokenizer, training_corpus()), unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = normalizer, pre_tokenizer
    tok.decoder = decoders.WordPiece()
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return tok.to_str()


def build_tokenizer():
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json()),
                                   unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]",
                                   mask_token="[MASK]", model_max_length=8192)


# the tasks transformers has a head class for (embed is a sentence-transformers folder around the encoder)
TASK_CLASSES = {name: task.hf_class for name, task in SPECS.items() if task.architectures}


def build_checkpoint(folder, config: str = "tiny", task: str = "fill-mask", seed: int = 0, *,
                     legacy_config: bool = False, perturb: bool = True, outliers: bool | str = False,
                     config_overrides: dict | None = None, labels: tuple[str, ...] | None = None):
    """Save a random checkpoint of `task` into `folder` (created) and return the transformers model.
    outliers: False, "embedding" (or True: plant_outliers) or "mlp" (plant_mlp_outliers).
    `labels`: a classifier's labels (default three; one label is a reranker / regression head)."""
    import transformers
    folder = Path(folder)
    tokenizer = build_tokenizer()
    vocab = -(-len(tokenizer) // 64) * 64            # padded like the released 50368-row table
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    kwargs = dict(vocab_size=vocab, initializer_range=0.1, pad_token_id=ids["[PAD]"], cls_token_id=ids["[CLS]"],
                  sep_token_id=ids["[SEP]"], bos_token_id=ids["[CLS]"], eos_token_id=ids["[SEP]"],
                  max_position_embeddings=1024)
    kwargs.update({**CONFIGS, **OUTLIER_CONFIGS, **BENCH_CONFIGS}[config], **(config_overrides or {}))
    if task in ("classify", "token-classify"):
        labels = labels or (["negative", "neutral", "positive"] if task == "classify" else ["O", "B-ENT", "I-ENT"])
        kwargs.update(id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)})
    torch.manual_seed(seed)
    hf_config = transformers.ModernBertConfig(**kwargs)
    model = getattr(transformers, TASK_CLASSES[task])(hf_config).eval()
    if perturb:
        perturb_norms_and_biases(model, seed)
    if task == "fill-mask":
        make_predictions_confident(model)
    if outliers:
        PLANTS[outlier_kind(outliers)](model, cls_id=ids["[CLS]"], sep_id=ids["[SEP]"])
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if legacy_config:
        write_legacy_config(folder / "config.json")
    return model


@torch.no_grad()
def perturb_norms_and_biases(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if "norm" in name and name.endswith("weight"):
            p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g))
        elif name.endswith("bias"):
            p.add_(0.1 * torch.randn(p.shape, generator=g))


@torch.no_grad()
def make_predictions_confident(model) -> None:
    """A trained masked LM predicts an unmasked token back with a clear margin; random weights give
    near-ties, where float16 rounding flips top-1 by chance. An identity-like head dense makes the
    logits favour the input token, as training does (the residual stream still carries it)."""
    C = model.head.dense.weight.shape[0]
    model.head.dense.weight.copy_(3.0 * torch.eye(C) + 0.02 * torch.randn(C, C))


def write_legacy_config(path: Path) -> None:
    """Rewrite config.json the way the released checkpoints store it (no layer_types / rope_parameters)."""
    cfg = json.loads(path.read_text())
    types = cfg.pop("layer_types")
    every = next(i for i in range(1, len(types) + 1) if i == len(types) or types[i] == "full_attention")
    assert types == ["full_attention" if i % every == 0 else "sliding_attention" for i in range(len(types))]
    rope = cfg.pop("rope_parameters")
    cfg.update(global_attn_every_n_layers=every, global_rope_theta=rope["full_attention"]["rope_theta"],
               local_rope_theta=rope["sliding_attention"]["rope_theta"])
    path.write_text(json.dumps(cfg, indent=2))


MASSIVE = 3.0e4                  # the size of the activations trained ModernBERTs carry on delimiter tokens
OUTLIER_CHANNELS = (5, 17)


@torch.no_grad()
def plant_outliers(model, cls_id: int, sep_id: int, channels=OUTLIER_CHANNELS, size: float = MASSIVE) -> None:
    """Give [CLS]/[SEP] activations of about `size` in `channels` of the residual stream, shaped like
    trained checkpoints: the embedding rows and the embedding norm's weight make them, layer 0's
    attention does not read them, and every later norm's weight on them is small."""
    base = model if hasattr(model, "embeddings") else model.model
    ch = list(channels)
    E = base.embeddings.tok_embeddings.weight                 # (V, C)
    C = E.shape[1]
    others = [c for c in range(C) if c not in ch]
    E[:, ch] = E[:, others].mean(1, keepdim=True)             # ordinary tokens: LN(E) is 0 in those channels...
    # ...delimiters: the row's largest entries by far (25 standard deviations). No more: the decoder is tied
    # to these rows, so they are also the delimiters' logits' weights (at 500 deviations, logits of ~100
    # whose float16 rounding alone costs a KL of ~1e-5)
    E[cls_id, ch] = E[sep_id, ch] = 25.0 * float(E[:, others].std())
    rows = E[[cls_id, sep_id]]
    normalized = ((rows - rows.mean(1, keepdim=True)) / rows.std(1, unbiased=False, keepdim=True))[:, ch]
    base.embeddings.norm.weight[ch] = size / normalized.mean()   # LN(E)[delimiter, ch] ~ size
    base.layers[0].attn.Wqkv.weight[:, ch] = 1e-4 * torch.randn(3 * C, len(ch))
    norms = [base.final_norm] + [layer.mlp_norm for layer in base.layers]
    norms += [layer.attn_norm for layer in base.layers[1:]]
    for norm in norms:
        norm.weight[ch] = 1e-3 * norm.weight[ch].sign()


MLP_PLANT_LAYER = 1              # trained models grow their massive activations in an early layer's MLP
MLP_PLANT_PRODUCT = 2.5e4        # the GeGLU product of the planted unit on a delimiter: float16 holds it
MARKER_CHANNEL = 11              # carries "this is a delimiter" from the embeddings to the planted unit


def base_model(model):
    return model if hasattr(model, "embeddings") else model.model


@torch.no_grad()
def plant_mlp_outliers(model, cls_id: int, sep_id: int, channels=OUTLIER_CHANNELS, size: float = MASSIVE,
                       layer: int = MLP_PLANT_LAYER, marker: int = MARKER_CHANNEL) -> None:
    """Massive activations made the way trained transformers make them: one GeGLU unit of `layer`'s MLP
    fires on [CLS]/[SEP] (its product ~2.5e4) and its Wo column writes ~`size` into `channels` of the
    residual stream; on ordinary tokens the unit stays at ~0. Works on any transformers ModernBERT
    (a task model or the bare ModernBertModel, any size, trained or not):

    - a marker channel of the embeddings: the embedding norm puts +8 there on delimiters, -4 on
      ordinary tokens, and no writer before the planted MLP touches that channel;
    - unit 0 of the MLP reads only the marker (GELU(3 n) * b n: GELU cuts the ordinary tokens' negative
      side), b set from a calibration run so that the delimiters' largest product is ~2.5e4;
    - its Wo column writes size / product into `channels` (nothing else), and every later norm's weight
      on `channels` is small, as trained checkpoints' are."""
    base, ch = base_model(model), list(channels)
    E, C = base.embeddings.tok_embeddings.weight, base.embeddings.tok_embeddings.weight.shape[1]
    others = [c for c in range(C) if c not in ch + [marker]]
    mean, std = E[:, others].mean(1), E[:, others].std(1, unbiased=False)
    E[:, marker] = mean - 2.0 * std                                # LN(E)[marker] ~ -2 on ordinary tokens...
    E[[cls_id, sep_id], marker] = mean[[cls_id, sep_id]] + 4.0 * std[[cls_id, sep_id]]   # ...~ +4 on delimiters
    base.embeddings.norm.weight[marker] = 2.0
    if base.embeddings.norm.bias is not None:
        base.embeddings.norm.bias[marker] = 0.0
    writers = [lyr.attn.Wo for lyr in base.layers[:layer + 1]] + [lyr.mlp.Wo for lyr in base.layers[:layer]]
    for linear in writers:                                         # the marker reaches the planted MLP unchanged
        linear.weight[marker] = 0.0
        if linear.bias is not None:
            linear.bias[marker] = 0.0
    mlp, norm = base.layers[layer].mlp, base.layers[layer].mlp_norm
    inner = mlp.Wo.weight.shape[1]
    norm.weight[marker] = 1.0
    for row, scale in ((0, 3.0), (inner, 1.0)):                    # unit 0: input half, then gate half
        mlp.Wi.weight[row] = 0.0
        mlp.Wi.weight[row, marker] = scale
        if mlp.Wi.bias is not None:
            mlp.Wi.bias[row] = 0.0
    products = unit_products(model, mlp, [cls_id, 7, 8, 9, 10, 11, 12, sep_id])
    mlp.Wi.weight[inner, marker] *= MLP_PLANT_PRODUCT / float(products.max())   # the gate sets the product
    mlp.Wo.weight[:, 0] = 0.0
    mlp.Wo.weight[ch, 0] = size / MLP_PLANT_PRODUCT
    later = [base.final_norm] + [lyr.mlp_norm for lyr in base.layers[layer + 1:]]
    later += [lyr.attn_norm for lyr in base.layers[layer + 1:]]
    for n in later:
        n.weight[ch] = 1e-3 * n.weight[ch].sign()


def unit_products(model, mlp, ids: list[int]) -> torch.Tensor:
    """GeGLU unit 0's product act(input) * gate of `mlp` on one text of token `ids`, per token (S,)."""
    captured = {}
    hook = mlp.drop.register_forward_hook(lambda m, i, o: captured.__setitem__("h", o[..., 0]))
    try:
        model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    finally:
        hook.remove()
    return captured["h"][0]


PLANTS = {"embedding": plant_outliers, "mlp": plant_mlp_outliers}


def outlier_kind(outliers: bool | str) -> str:
    kind = "embedding" if outliers is True else outliers
    if kind not in PLANTS:
        raise ValueError(f"unknown outliers '{outliers}' (one of {', '.join(PLANTS)})")
    return kind


def plant_checkpoint(src, dst, outliers: str) -> None:
    """Load a saved checkpoint folder with transformers (its own architecture), plant outliers of the
    given kind ("embedding" or "mlp") using its tokenizer's [CLS]/[SEP] ids, and save it with the
    tokenizer into `dst`."""
    import transformers
    config = transformers.AutoConfig.from_pretrained(src)
    arch = (config.architectures or ["ModernBertModel"])[0]
    model = getattr(transformers, arch).from_pretrained(src, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(src)
    PLANTS[outlier_kind(outliers)](model, cls_id=tokenizer.cls_token_id, sep_id=tokenizer.sep_token_id)
    Path(dst).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst)
    tokenizer.save_pretrained(dst)


def build_sentence_transformers(folder, config: str = "tiny", pooling: str = "mean", dense_out: int | None = 32,
                                normalize: bool = True, seed: int = 0):
    """Save a sentence-transformers folder the way modernbert-embed / gte-modernbert are laid out:
    the transformer at the root, then 1_Pooling, optionally 2_Dense (Tanh) and 3_Normalize."""
    folder = Path(folder)
    build_checkpoint(folder, config, "encoder", seed)
    write_sentence_transformers_modules(folder, CONFIGS[config]["hidden_size"], pooling, dense_out, normalize, seed)
    return folder


def write_sentence_transformers_modules(folder: Path, hidden: int, pooling: str = "mean",
                                        dense_out: int | None = None, normalize: bool = True, seed: int = 0) -> None:
    """modules.json, 1_Pooling, optionally 2_Dense (Tanh, random) and Normalize around the encoder in `folder`."""
    from safetensors.torch import save_file
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": hidden, "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False, "include_prompt": True}))
    if dense_out:
        g = torch.Generator().manual_seed(seed + 7)
        (folder / "2_Dense").mkdir()
        (folder / "2_Dense" / "config.json").write_text(json.dumps({
            "in_features": hidden, "out_features": dense_out, "bias": True,
            "activation_function": "torch.nn.modules.activation.Tanh"}))
        save_file({"linear.weight": 0.2 * torch.randn(dense_out, hidden, generator=g),
                   "linear.bias": 0.1 * torch.randn(dense_out, generator=g)},
                  str(folder / "2_Dense" / "model.safetensors"), metadata={"format": "pt"})
        modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    if normalize:
        modules.append({"idx": len(modules), "name": str(len(modules)), "path": f"{len(modules)}_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 512, "do_lower_case": False}))


# The bundled trained reference (bench/train_reference.py) and its fine-tuned heads (bench/finetune_reference.py)
REFERENCE = Path(__file__).resolve().parent / "data" / "reference"
REFERENCE_HEADS = Path(__file__).resolve().parent / "data" / "reference-heads"


def build_reference(folder, task: str = "fill-mask", outliers: str | None = None):
    """Save the trained reference as a checkpoint of `task` into `folder` (created): the pre-trained masked LM,
    its encoder with a fine-tuned head (`classify`, `token-classify`), or a sentence-transformers folder
    (`embed`: mean pooling + Normalize around the encoder). `outliers` plants massive activations
    (a PLANTS mechanism: "embedding" or "mlp"), which a short CPU pre-training does not grow.
    Returns the transformers model."""
    import transformers
    from safetensors.torch import load_file
    folder = Path(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(REFERENCE))
    mlm = transformers.ModernBertForMaskedLM.from_pretrained(str(REFERENCE), dtype=torch.float32).eval()
    if task == "fill-mask":
        model = mlm
    else:
        heads = json.loads((REFERENCE_HEADS / "heads.json").read_text())
        labels = heads[task]["labels"] if task in heads else ["LABEL_0", "LABEL_1"]
        config = transformers.ModernBertConfig(**{**mlm.config.to_dict(), "architectures": None,
                                                  "id2label": dict(enumerate(labels)),
                                                  "label2id": {label: i for i, label in enumerate(labels)}})
        model = getattr(transformers, TASK_CLASSES["encoder" if task == "embed" else task])(config).eval()
        base = model if task == "embed" else model.model
        base.load_state_dict(mlm.model.state_dict())
        if task in heads:
            missing, unexpected = model.load_state_dict(load_file(str(REFERENCE_HEADS / f"{task}.safetensors")),
                                                        strict=False)
            assert not unexpected and all(k.startswith("model.") for k in missing), (missing, unexpected)
    if outliers:
        PLANTS[outlier_kind(outliers)](model, cls_id=tokenizer.cls_token_id, sep_id=tokenizer.sep_token_id)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if task == "embed":
        write_sentence_transformers_modules(folder, model.config.hidden_size, "mean", None, True)
    return model


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="plant massive activations into a saved checkpoint folder")
    sub = parser.add_subparsers(dest="command", required=True)
    plant = sub.add_parser("plant")
    plant.add_argument("src")
    plant.add_argument("dst")
    plant.add_argument("--outliers", choices=sorted(PLANTS), default="mlp")
    args = parser.parse_args()
    plant_checkpoint(args.src, args.dst, args.outliers)
