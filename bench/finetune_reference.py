"""Fine-tune heads on the bundled reference ModernBERT: a line classifier and a token classifier.

    python bench/finetune_reference.py                   # reads tests/data/reference, ~3 min on 2 CPU cores

Labels come from the corpus itself (the Python standard library, train/held-out split as in
train_reference.py), found by Python's own `tokenize` module:
- `classify`: a source line is `code`, `comment` or `docstring`, with the `#` and quote marks removed
  so that the words decide; cls-free mean pooling, as the base model's config says;
- `token-classify`: every BPE token of a source window is labelled with the kind of Python token it
  starts in: keyword, name, operator, number, string, comment, or O (white space, line breaks).

The encoder stays frozen and only the head (dense, GELU, norm, classifier) is trained, on features
computed once: a full fine-tune would store the 25 MB encoder again per head, and the test data must
stay small. `tests/checkpoints.py::build_reference` joins the encoder and a head into a checkpoint
folder saved by transformers. Writes `tests/data/reference-heads/{classify,token-classify}.safetensors`
and `heads.json` (labels and held-out accuracy next to the majority-class baseline). Deterministic.
"""
import argparse
import io
import json
import keyword
import os
import random
import shutil
import sys
import tokenize
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_reference import DEFAULT_OUT, ROOT, corpus_files, fail, is_held_out  # noqa: E402

HEADS_OUT = ROOT / "tests" / "data" / "reference-heads"
LINE_LABELS = ["code", "comment", "docstring"]
TOKEN_LABELS = ["O", "keyword", "name", "operator", "number", "string", "comment"]
WINDOW = 126                                   # BPE tokens per token-classification window (+ [CLS] [SEP])


def python_tokens(text: str):
    """Python's tokens of `text` as (kind, start offset, end offset); [] if it does not tokenize."""
    line_starts = [0]
    for line in text.splitlines(keepends=True):
        line_starts.append(line_starts[-1] + len(line))
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return []
    out = []
    for t in tokens:
        start = line_starts[t.start[0] - 1] + t.start[1]
        end = line_starts[t.end[0] - 1] + t.end[1]
        out.append((t, start, end))
    return out


def token_kind(t: tokenize.TokenInfo) -> str:
    if t.type == tokenize.NAME:
        return "keyword" if keyword.iskeyword(t.string) else "name"
    return {tokenize.OP: "operator", tokenize.NUMBER: "number", tokenize.STRING: "string",
            tokenize.COMMENT: "comment"}.get(t.type, "O")


def labelled_lines(text: str) -> list[tuple[str, int]]:
    """(line without # or quotes, label) for the comment lines, docstring lines and code lines of a file."""
    tokens = python_tokens(text)
    lines = text.splitlines()
    kinds = {}
    prev = None
    for t, _, _ in tokens:
        if t.type == tokenize.COMMENT and t.line.strip().startswith("#"):
            kinds[t.start[0]] = "comment"
        elif t.type == tokenize.STRING and prev in (tokenize.INDENT, tokenize.NEWLINE, tokenize.NL, None) \
                and t.string.lstrip("rbuRBU").startswith(('"""', "'''")):
            for row in range(t.start[0], t.end[0] + 1):
                kinds[row] = "docstring"
        elif t.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.COMMENT,
                            tokenize.ENDMARKER):
            kinds.setdefault(t.start[0], "code")
        if t.type not in (tokenize.NL, tokenize.COMMENT):
            prev = t.type
    out = []
    for row, kind in kinds.items():
        line = lines[row - 1].strip().lstrip("#").replace('"""', "").replace("'''", "").strip()
        if len(line.split()) >= 3:
            out.append((line, LINE_LABELS.index(kind)))
    return out


def line_dataset(held_out: bool, per_label: int, seed: int) -> tuple[list[str], list[int]]:
    pool = {i: [] for i in range(len(LINE_LABELS))}
    for rel, path in corpus_files():
        if is_held_out(rel) == held_out:
            for line, label in labelled_lines(path.read_text(errors="replace")):
                pool[label].append(line)
    rng = random.Random(seed)
    texts, labels = [], []
    for label, lines in pool.items():
        lines = sorted(set(lines))
        rng.shuffle(lines)
        texts += lines[:per_label]
        labels += [label] * len(lines[:per_label])
    return texts, labels


def token_dataset(tokenizer, held_out: bool, windows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, WINDOW + 2) ids and labels (-100 on [CLS]/[SEP]) of source windows, from files that tokenize."""
    ids_rows, label_rows = [], []
    files = [(rel, p) for rel, p in corpus_files() if is_held_out(rel) == held_out]
    random.Random(seed).shuffle(files)
    for rel, path in files:
        text = path.read_text(errors="replace")
        spans = [(start, end, TOKEN_LABELS.index(token_kind(t))) for t, start, end in python_tokens(text)
                 if end > start]
        if not spans:
            continue
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        labels, j = [], 0
        for start, end in enc["offset_mapping"]:
            while j < len(spans) and spans[j][1] <= start:
                j += 1
            inside = j < len(spans) and spans[j][0] <= start < spans[j][1]
            labels.append(spans[j][2] if inside else 0)
        for k in range(0, len(labels) - WINDOW, WINDOW * 4):   # spread the windows over the file
            ids_rows.append([tokenizer.cls_token_id, *enc["input_ids"][k:k + WINDOW], tokenizer.sep_token_id])
            label_rows.append([-100, *labels[k:k + WINDOW], -100])
        if len(ids_rows) >= windows:
            break
    return torch.tensor(ids_rows[:windows]), torch.tensor(label_rows[:windows])


@torch.no_grad()
def encoder_features(encoder, ids: torch.Tensor, mask: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """The frozen encoder's last hidden states (after its final norm), (N, S, C)."""
    out = []
    for i in range(0, len(ids), batch):
        out.append(encoder(input_ids=ids[i:i + batch], attention_mask=mask[i:i + batch]).last_hidden_state)
    return torch.cat(out)


def train_head(head, classifier, features, labels, epochs: int, seed: int, lr: float = 1e-3):
    """Train head + classifier on fixed features ((N, C) pooled or (N, C) per token), full-batch AdamW."""
    torch.manual_seed(seed)
    params = list(head.parameters()) + list(classifier.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        order = torch.randperm(len(features), generator=g)
        for i in range(0, len(order), 256):
            idx = order[i:i + 256]
            loss = torch.nn.functional.cross_entropy(classifier(head(features[idx])), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return loss.item()


@torch.no_grad()
def accuracy(head, classifier, features, labels) -> float:
    return (classifier(head(features)).argmax(-1) == labels).float().mean().item()


def majority(labels: torch.Tensor) -> float:
    return torch.bincount(labels).max().item() / len(labels)


def labelled_config(config, labels: list[str]):
    import transformers
    return transformers.ModernBertConfig(**{**config.to_dict(), "architectures": None,
                                            "id2label": dict(enumerate(labels)),
                                            "label2id": {label: i for i, label in enumerate(labels)}})


def mean_pool(hidden, mask):
    return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)


def main(argv=None):
    import transformers
    from safetensors.torch import save_file
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference", type=Path, default=DEFAULT_OUT, help="the pre-trained checkpoint")
    p.add_argument("--out", type=Path, default=HEADS_OUT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    if args.out.exists() and not args.force:
        fail(f"{args.out} exists; pass --force to replace it")
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(args.reference))
    mlm = transformers.ModernBertForMaskedLM.from_pretrained(str(args.reference), dtype=torch.float32).eval()
    config = mlm.config
    results, tensors = {}, {}

    # classify: mean-pooled lines
    for split, per_label in (("train", 3000), ("held_out", 400)):
        texts, labels = line_dataset(split == "held_out", per_label, args.seed)
        enc = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
        pooled = mean_pool(encoder_features(mlm.model, enc["input_ids"], enc["attention_mask"]),
                           enc["attention_mask"])
        results.setdefault("classify", {})[split] = (pooled, torch.tensor(labels))
        print(f"classify {split}: {len(texts)} lines", flush=True)
    cfg = labelled_config(config, LINE_LABELS)
    clf = transformers.ModernBertForSequenceClassification(cfg)
    (x, y), (xh, yh) = results["classify"]["train"], results["classify"]["held_out"]
    train_head(clf.head, clf.classifier, x, y, epochs=40, seed=args.seed)
    quality = {"classify": {"labels": LINE_LABELS, "held_out_accuracy": accuracy(clf.head, clf.classifier, xh, yh),
                            "majority_baseline": majority(yh), "held_out_examples": len(yh)}}
    tensors["classify"] = {f"head.{k}": v for k, v in clf.head.state_dict().items()}
    tensors["classify"].update({f"classifier.{k}": v for k, v in clf.classifier.state_dict().items()})

    # token-classify: every token of source windows
    feats = {}
    for split, windows in (("train", 600), ("held_out", 120)):
        ids, labels = token_dataset(tokenizer, split == "held_out", windows, args.seed)
        hidden = encoder_features(mlm.model, ids, torch.ones_like(ids))
        keep = labels != -100
        feats[split] = (hidden[keep], labels[keep])
        print(f"token-classify {split}: {len(ids)} windows, {int(keep.sum())} tokens", flush=True)
    cfg = labelled_config(config, TOKEN_LABELS)
    tok = transformers.ModernBertForTokenClassification(cfg)
    (x, y), (xh, yh) = feats["train"], feats["held_out"]
    train_head(tok.head, tok.classifier, x, y, epochs=8, seed=args.seed)
    quality["token-classify"] = {"labels": TOKEN_LABELS, "held_out_accuracy": accuracy(tok.head, tok.classifier, xh, yh),
                                 "majority_baseline": majority(yh), "held_out_examples": len(yh)}
    tensors["token-classify"] = {f"head.{k}": v for k, v in tok.head.state_dict().items()}
    tensors["token-classify"].update({f"classifier.{k}": v for k, v in tok.classifier.state_dict().items()})

    for task, q in quality.items():
        print(f"{task}: held-out accuracy {q['held_out_accuracy']:.3f} (majority class {q['majority_baseline']:.3f}, "
              f"{q['held_out_examples']} examples)", flush=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for task, t in tensors.items():
        save_file({k: v.detach().half().contiguous() for k, v in t.items()}, str(tmp / f"{task}.safetensors"),
                  metadata={"format": "pt"})
    (tmp / "heads.json").write_text(json.dumps(quality, indent=2) + "\n")
    if args.out.exists():
        shutil.rmtree(args.out)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
