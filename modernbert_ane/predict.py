"""Run a converted package on texts and print what it predicts.

    python predict.py model.mlpackage "The capital of France is [MASK]."
    python predict.py classifier.mlpackage "great film" "dull film" --json
    python predict.py embedder.mlpackage "a cat on a mat" --labels animals,finance,sport
    python predict.py model.mlpackage --file texts.txt --pack          # one text per line
    python predict.py reranker.mlpackage "a cat on a mat" --pair "where is the cat?"
    python predict.py embedder.mlpackage "what is rope?" --prompt query

Reads the package's metadata (task, tokenizer, lengths, labels) written by convert.py, tokenizes
each text ([CLS] ... [SEP]; a text pair as the tokenizer joins pairs), runs it at the smallest length
the package accepts that fits (Core ML on macOS, the float16 emulator elsewhere) and prints, per task:
the top-k tokens at every mask token (fill-mask), the labels with their probabilities (classify), a
label per word of the input, found through the tokenizer's character offsets (token-classify), the
embedding and cosine similarities (embed), or the hidden states' shape and norms (encoder).
--pack puts several texts into one prediction (segment ids in attention_mask); results are the same.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

from modernbert_ane.checkpoint import load_tokenizer
from modernbert_ane.coreml.macos import DEFAULT_COMPUTE_UNITS
from modernbert_ane.coreml.package import Package, PackageError, check_token_ids, package_inputs, tokenizer_revision
from modernbert_ane.coreml.runner import PackageRunner, resolve_backend
from modernbert_ane.tasks import OUTPUT_NAMES, POOLED_TASKS, TASKS
from modernbert_ane import cli
from modernbert_ane.user_errors import UserError, run_cli

SHOW_VALUES = 8                                    # embedding values shown (all of them with --json)
SHOW_TOKENS = 16                                   # encoder tokens whose norm is shown (all with --json)


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    cli.add_package(p, "run")
    p.add_argument("texts", nargs="*", help="texts to run (default: --file, or stdin; '-' reads stdin)")
    p.add_argument("--file", metavar="PATH", help="read the texts from this file, one per line (blank lines skipped; "
                                                  "with a classify package, a tab starts the text's pair)")
    p.add_argument("--pair", metavar="TEXT", help="classify (rerankers, NLI): the second text of every pair")
    p.add_argument("--prompt", metavar="NAME", help="embed: put the package's prompt NAME (from the checkpoint's "
                                                    "sentence-transformers config) before every text")
    p.add_argument("--top-k", type=int, default=5, metavar="K", help="fill-mask: tokens shown per mask (default 5)")
    p.add_argument("--labels", metavar="A,B,C", help="embed: comma-separated label texts to rank by cosine similarity (zero-shot)")
    # not the diff scripts' --json PATH (a file of metrics): predict prints its results as JSON instead of text
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    cli.add_backend(p)
    cli.add_tokenizer(p)
    p.add_argument("--truncate", action="store_true", help="truncate texts longer than the package's largest length")
    p.add_argument("--pack", action="store_true", help="put several texts into one prediction (faster for short texts)")
    return p


# ----------------------------------------------------------------------------- inputs

def package_metadata(package: Package, function: str | None = None) -> dict:
    """The metadata of a package's function, with a known task."""
    meta = package.metadata(function)
    if meta["task"] not in TASKS:
        raise PackageError(f"{package.path} has task '{meta['task']}', which predict.py does not know "
                           f"(one of {', '.join(TASKS)}); is this predict.py older than the converter?")
    return meta


def parse_labels(labels: str | None, task: str) -> list[str] | None:
    if labels is None:
        return None
    if task != "embed":
        raise UserError(f"--labels needs an embed package (zero-shot by cosine similarity); this one is {task}")
    names = [name.strip() for name in labels.split(",") if name.strip()]
    if not names:
        raise UserError("--labels is empty; give comma-separated label texts, e.g. --labels sport,politics")
    return names


def max_texts_per_prediction(meta: dict, pack: bool) -> int:
    """How many texts one prediction may hold: 1 unpacked, the package's max_texts packed. Only a package
    converted with --max-texts K > 1 reads segment ids in attention_mask (and restarts positions per
    text); any other reads a 2 as a token mask, so packing it would silently mix the texts."""
    if not pack:
        return 1
    max_texts = int(meta.get("max_texts") or 1)
    if max_texts < 2:
        what = f"several {meta['task']} results" if meta["task"] in POOLED_TASKS else "several texts"
        raise UserError(f"--pack needs a package that takes {what} per prediction; this one takes 1 "
                        f"(convert it with --max-texts N)")
    return max_texts


def split_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def read_texts(args) -> list[str]:
    """The texts: arguments, --file, or stdin ('-', or no arguments with stdin not a terminal)."""
    if args.file and args.texts:
        raise UserError("give texts as arguments or with --file, not both")
    if args.file:
        path = Path(args.file)
        if not path.exists():
            raise UserError(f"no such file: {path}")
        if not path.is_file():                     # a folder, or a pipe that would block: never opened
            raise UserError(f"cannot read {path}: not a regular file; give a text file, or pipe the texts on stdin")
        try:
            texts = split_lines(path.read_bytes().decode("utf-8"))
        except OSError as e:
            raise UserError(f"cannot read {path} ({e.strerror or e})") from e
        except UnicodeDecodeError as e:
            raise UserError(f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from e
        if not texts:
            raise UserError(f"{path} holds no texts (it is empty or blank); give one text per line")
    elif args.texts == ["-"] or (not args.texts and sys.stdin is not None and not sys.stdin.isatty()):
        data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
        try:
            texts = split_lines(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise UserError(f"stdin is not UTF-8 text (byte {e.start})") from e
        if not texts:
            raise UserError("stdin held no texts (it was empty or blank); give them as arguments, with --file "
                            "PATH, or one per line on stdin")
    else:
        texts = list(args.texts)
    if not texts:
        raise UserError("no texts: give them as arguments, with --file PATH, or on stdin")
    for i, text in enumerate(texts):
        if not text.strip():
            raise UserError(f"text {i + 1} is empty")
    return texts


PAIR_SEPARATOR = "\t"                           # a line "text<TAB>pair" of --file or stdin


def split_pairs(texts: list[str], pair: str | None, task: str) -> tuple[list[str], list[str | None]]:
    """(first texts, their pairs or None): --pair pairs every text with one text, a tab in a line gives that
    line its own pair. Only classify packages (rerankers, NLI) read pairs."""
    has_tabs = any(PAIR_SEPARATOR in t for t in texts)
    if pair is None and not has_tabs:
        return texts, [None] * len(texts)
    if task != "classify":
        what = "--pair" if pair is not None else "a tab in a text (the start of its pair)"
        raise UserError(f"{what} needs a classify package (a reranker or NLI head reads text pairs); this one is {task}")
    if pair is not None and not pair.strip():
        raise UserError("--pair is empty; give the second text of the pairs")
    firsts, pairs = [], []
    for i, text in enumerate(texts):
        first, tab, second = text.partition(PAIR_SEPARATOR)
        if tab and pair is not None:
            raise UserError(f"text {i + 1} has its own pair after a tab, and --pair gives another; use one of them")
        second = second if tab else pair
        if not first.strip() or (second is not None and not second.strip()):
            raise UserError(f"text {i + 1}: {'its pair' if first.strip() else 'its first text'} is empty")
        firsts.append(first)
        pairs.append(second)
    return firsts, pairs


def apply_prompt(texts: list[str], name: str | None, meta: dict, task: str) -> list[str]:
    """--prompt NAME: the package's prompt put before every text (sentence-transformers' prompts)."""
    if name is None:
        return texts
    prompts = (meta.get("prompts") or {}).get("prompts") or {}
    if task != "embed" or not prompts:
        raise UserError(f"--prompt needs an embed package converted from a sentence-transformers checkpoint "
                        f"with prompts; this one ({task}) has none")
    if name not in prompts:
        raise UserError(f"the package has no prompt '{name}' (it has {', '.join(sorted(prompts))})")
    return [prompts[name] + text for text in texts]


def encode(tokenizer, text: str, what: str, limit: int, truncate: bool, pair: str | None = None) -> list[int]:
    """Token ids of one text ([CLS] ... [SEP]; a pair as the tokenizer joins pairs), at most `limit` of them
    (truncated keeping the last [SEP], or refused). `what` names the text in messages ("text 2", "label 'sport'")."""
    ids = list(tokenizer(text, pair)["input_ids"] if pair is not None else tokenizer(text)["input_ids"])
    if len(ids) > limit:
        if not truncate:
            raise UserError(f"{what} is {len(ids)} tokens, {len(ids) - limit} too many for the package's "
                            f"largest length {limit}; shorten it or pass --truncate")
        print(f"{what}: truncated from {len(ids)} to {limit} tokens", file=sys.stderr)
        ids = ids[:limit - 1] + ids[-1:]
    return ids


def special_token_id(tokenizer, meta: dict, name: str) -> int:
    """The tokenizer's id for `name` ("mask", "pad"), the package's metadata as fallback."""
    token_id = getattr(tokenizer, f"{name}_token_id", None)
    token_id = meta.get(f"{name}_token_id") if token_id is None else token_id
    if token_id is None:
        raise UserError(f"neither the tokenizer nor the package names a {name} token")
    return int(token_id)


def mask_name(tokenizer) -> str:
    """The mask token as the tokenizer writes it ([MASK] for ModernBERT's, <mask> for a Gemma vocabulary)."""
    return tokenizer.mask_token or "[MASK]"


def check_masks(seqs: list[list[int]], tokenizer, meta: dict) -> None:
    """fill-mask: every text needs a mask token to fill (after truncation)."""
    mask_id = special_token_id(tokenizer, meta, "mask")
    for i, ids in enumerate(seqs):
        if mask_id not in ids:
            raise UserError(f"text {i + 1} has no {mask_name(tokenizer)} token to fill (the package is fill-mask)")


# ----------------------------------------------------------------------------- running

def pack_groups(sizes: list[int], limit: int, max_texts: int) -> list[list[int]]:
    """Greedy: consecutive texts share a prediction while their tokens fit in `limit` and they are at most max_texts."""
    groups, used = [], 0
    for i, size in enumerate(sizes):
        if groups and used + size <= limit and len(groups[-1]) < max_texts:
            groups[-1].append(i)
            used += size
        else:
            groups.append([i])
            used = size
    return groups


def run_all(runner, meta: dict, seqs: list[list[int]], lengths: list[int], pad_id: int, max_texts):
    """(per text {'rows': its output, (tokens, X) or pooled (X,); 'length': its prediction's length},
    number of predictions run)."""
    task, name = meta["task"], meta.get("output") or OUTPUT_NAMES[meta["task"]]
    results = [None] * len(seqs)
    groups = pack_groups([len(s) for s in seqs], lengths[-1], max_texts)
    for group in groups:
        total = sum(len(seqs[i]) for i in group)
        length = next(n for n in lengths if n >= total)
        outputs = runner.predict(package_inputs([seqs[i] for i in group], length, pad_id))
        if name not in outputs:
            raise UserError(f"the package has no output '{name}' (it has {', '.join(sorted(outputs))})")
        out = outputs[name]
        if task in POOLED_TASKS:
            rows = out.reshape(-1, out.shape[-1])                    # (1, X) or (1, K, X) -> (K, X)
            if rows.shape[0] < len(group):
                raise UserError(f"the package returned {rows.shape[0]} {task} results for {len(group)} packed texts")
            for k, i in enumerate(group):
                results[i] = {"rows": rows[k], "length": length}
        else:
            start = 0
            for i in group:
                results[i] = {"rows": out[0, start:start + len(seqs[i])], "length": length}
                start += len(seqs[i])
    return results, len(groups)


# ----------------------------------------------------------------------------- per task

def softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def token_text(tokenizer, token_id: int) -> str:
    """What a vocabulary entry reads as; ids past the tokenizer's vocabulary (padding rows) by number."""
    if token_id >= len(tokenizer):
        return f"<id {token_id}>"
    return tokenizer.decode([token_id])


def fill_mask_result(rows, ids, tokenizer, mask_id: int, top_k: int) -> dict:
    masks = []
    for position in [i for i, t in enumerate(ids) if t == mask_id]:
        probs = softmax(rows[position])
        top = np.argsort(-probs, kind="stable")[:top_k]
        masks.append({"position": position, "predictions": [
            {"id": int(t), "token": token_text(tokenizer, int(t)), "probability": float(probs[t])} for t in top]})
    return {"masks": masks}


def classify_result(row, meta: dict) -> dict:
    labels = label_names(meta, len(row))
    problem = meta.get("problem_type") or "single_label_classification"
    row = np.asarray(row, dtype=np.float64)
    if problem == "regression":
        scores = row
    elif problem == "multi_label_classification":
        scores = 1.0 / (1.0 + np.exp(-row))
    else:
        scores = softmax(row)
    order = np.argsort(-scores, kind="stable")
    return {"problem_type": problem, "logits": [float(v) for v in row],
            "labels": [{"label": labels[i], "score": float(scores[i])} for i in order]}


def label_names(meta: dict, n: int) -> list[str]:
    """The package's label names (strings, whatever id2label held), LABEL_i where it has none."""
    labels = meta.get("labels")
    if labels is not None and len(labels) != n:
        raise PackageError(f"the package names {len(labels)} labels for {n} outputs; is its metadata damaged?")
    return labels or [f"LABEL_{i}" for i in range(n)]


def token_spans(tokenizer, text: str, ids: list[int]) -> list[tuple[int, int, int | None] | None]:
    """Per token: (start, end, word) in `text` characters (None for special tokens). Words and spans come
    from the tokenizer's offsets (fast tokenizers: byte-level BPE, WordPiece, Unigram alike); a tokenizer
    without offsets gets each token's decoded text, found in order in `text` (tokens it cannot place: None)."""
    special = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}     # an unknown token is still input text
    n = len(ids)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, return_offsets_mapping=True)
        offsets, words = enc["offset_mapping"], enc.word_ids()
        last = len(offsets) - 1                                       # a truncated text kept its final [SEP]
        source = list(range(n - 1)) + [last] if n < len(offsets) else range(n)
        spans = []
        for i, j in enumerate(source):
            start, end = offsets[j]
            while start < end and text[start].isspace():              # byte-level BPE counts the leading space
                start += 1
            spans.append(None if ids[i] in special or start >= end else (start, end, words[j]))
        return spans
    spans, cursor, folded = [], 0, text.lower()
    for i, token_id in enumerate(ids):                    # a token's text: what it adds to the decoded prefix
        ordinary = [t for t in ids[:i] if t not in special]
        piece = "" if token_id in special else tokenizer.decode(ordinary + [token_id])[
            len(tokenizer.decode(ordinary)):].strip()
        start = folded.find(piece.lower(), cursor) if piece else -1
        spans.append(None if start < 0 else (start, start + len(piece), None))
        cursor = start + len(piece) if start >= 0 else cursor
    return spans


def token_classify_result(rows, ids, tokenizer, meta: dict, text: str) -> dict:
    """Per token (its text span, not the tokenizer's piece such as 'Ġ' or 'Ã©') and per word (the label of
    its first token, as token-classification training labels words)."""
    names = label_names(meta, rows.shape[-1])
    probs = softmax(rows)
    tokens, words = [], []
    for i, span in enumerate(token_spans(tokenizer, text, ids)):
        if span is None:
            continue
        start, end, word = span
        best = int(np.argmax(probs[i]))
        token = {"position": i, "token": text[start:end], "start": start, "end": end, "label": names[best],
                 "score": float(probs[i, best])}
        tokens.append(token)
        continues = words and (word is not None and word == words[-1]["word_id"] or
                               word is None and start == words[-1]["end"])
        if continues:
            words[-1].update(end=end, word=text[words[-1]["start"]:end])
            words[-1]["positions"].append(i)
        else:
            words.append({"word": text[start:end], "start": start, "end": end, "label": token["label"],
                          "score": token["score"], "positions": [i], "word_id": word})
    for w in words:
        del w["word_id"]
    return {"tokens": tokens, "words": words}


def encoder_result(rows, full: bool) -> dict:
    rows = np.asarray(rows, dtype=np.float64)
    result = {"shape": list(rows.shape), "norms": [float(v) for v in np.linalg.norm(rows, axis=-1)]}
    if full:
        result["hidden_states"] = rows.tolist()
    return result


def embed_result(row, full: bool) -> dict:
    row = np.asarray(row, dtype=np.float64)
    result = {"dimension": int(row.shape[-1]), "norm": float(np.linalg.norm(row)),
              "first_values": [float(v) for v in row[:SHOW_VALUES]]}
    if full:
        result["embedding"] = [float(v) for v in row]
    return result


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-30)
    b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-30)
    return a @ b.T


def zero_shot(text_rows: np.ndarray, label_rows: np.ndarray, labels: list[str]) -> list[list[dict]]:
    """Per text, the labels ranked by cosine similarity of their embeddings."""
    sims = cosine_matrix(text_rows, label_rows)
    return [[{"label": labels[j], "cosine": float(row[j])} for j in np.argsort(-row, kind="stable")] for row in sims]


def task_result(task: str, rows, ids, tokenizer, meta: dict, text: str, top_k: int, full: bool) -> dict:
    """What one text's output means, for its task (JSON-ready; `full`: every value of a vector output)."""
    if task == "fill-mask":
        return fill_mask_result(rows, ids, tokenizer, special_token_id(tokenizer, meta, "mask"), top_k)
    if task == "classify":
        return classify_result(rows, meta)
    if task == "token-classify":
        return token_classify_result(rows, ids, tokenizer, meta, text)
    if task == "encoder":
        return encoder_result(rows, full)
    return embed_result(rows, full)


def add_similarities(doc: dict, rows: np.ndarray, labels: list[str] | None) -> None:
    """embed: rank the labels per text (rows: the texts' embeddings, then the labels'), or, for two or
    more texts without labels, the pairwise cosine similarity matrix."""
    results = doc["results"]
    text_rows = rows[:len(results)]
    if labels:
        for result, ranked in zip(results, zero_shot(text_rows, rows[len(results):], labels)):
            result["labels"] = ranked
    elif len(results) > 1:
        doc["similarity"] = cosine_matrix(text_rows, text_rows).tolist()


# ----------------------------------------------------------------------------- output

def format_text(result: dict, index: int, task: str, mask: str = "[MASK]") -> str:
    """The human-readable block of one text (`mask`: the tokenizer's mask token)."""
    pair = f"  |  {result['pair']}" if result.get("pair") is not None else ""
    lines = [f"[{index + 1}] {result['text']}{pair}", f"    ({result['num_tokens']} tokens, length {result['length']})"]
    if task == "fill-mask":
        for masked in result["masks"]:
            lines.append(f"    {mask} at token {masked['position']}:")
            lines += [f"      {p['probability']:.4f}  {json.dumps(p['token'], ensure_ascii=False)}"
                      for p in masked["predictions"]]
    elif task == "classify":
        width = max(len(l["label"]) for l in result["labels"])
        what = "value" if result["problem_type"] == "regression" else "probability"
        lines.append(f"    {'label'.ljust(width)}  {what}")
        lines += [f"    {l['label'].ljust(width)}  {l['score']:.4f}" for l in result["labels"]]
    elif task == "token-classify":
        width = max([len(w["word"]) for w in result["words"]] + [5])
        label_width = max([len(w["label"]) for w in result["words"]] + [5])
        lines += [f"    {w['word'].ljust(width)}  {w['label'].ljust(label_width)}  {w['score']:.4f}"
                  for w in result["words"]]
    elif task == "encoder":
        norms = result["norms"]
        more = f" (first {SHOW_TOKENS} of {len(norms)}; --json for all)" if len(norms) > SHOW_TOKENS else ""
        lines.append(f"    hidden states {result['shape'][0]} x {result['shape'][1]}; L2 norm per token{more}:")
        lines.append("    " + " ".join(f"{v:.2f}" for v in norms[:SHOW_TOKENS]))
    elif task == "embed":
        lines.append(f"    dimension {result['dimension']}, L2 norm {result['norm']:.4f}")
        lines.append("    first values: " + " ".join(f"{v:+.4f}" for v in result["first_values"]))
        if "labels" in result:
            width = max(len(l["label"]) for l in result["labels"])
            lines.append(f"    {'label'.ljust(width)}  cosine")
            lines += [f"    {l['label'].ljust(width)}  {l['cosine']:+.4f}" for l in result["labels"]]
    return "\n".join(lines)


def format_similarity(matrix: list[list[float]]) -> str:
    n = len(matrix)
    lines = ["cosine similarity:", "      " + " ".join(f"[{j + 1}]".rjust(7) for j in range(n))]
    lines += [f"  [{i + 1}]".ljust(6) + " ".join(f"{v:+.4f}".rjust(7) for v in row) for i, row in enumerate(matrix)]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

def plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


class Predictor:
    """A package ready to run (predict.py's main, and the Python API): the package read and its metadata checked
    now, once; the tokenizer and the runner (Core ML or the emulator) loaded on first use, once. `run` returns
    predict.py's JSON document."""

    def __init__(self, package, backend: str = "auto", function: str | None = None, tokenizer: str | None = None,
                 compute_units: str = DEFAULT_COMPUTE_UNITS, use_cache: bool = True, pack: bool = False,
                 truncate: bool = False):
        resolve_backend(backend)                        # --backend coreml off macOS: refused before any work
        self.backend, self.truncate = backend, truncate
        self.compute_units, self.use_cache, self.tokenizer_source = compute_units, use_cache, tokenizer
        self._package = Package(package)                # PackageError for a missing or foreign path
        self.package = str(self._package.path)
        self.meta = package_metadata(self._package, function)
        self.task = self.meta["task"]
        self.lengths = self._package.lengths(self.meta["function"])   # ascending
        self.max_texts = max_texts_per_prediction(self.meta, pack)
        self._tokenizer = self._runner = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            source = self.tokenizer_source or self.meta.get("tokenizer")
            if not source:
                raise UserError("the package names no tokenizer; pass --tokenizer ID_OR_FOLDER")
            revision = None if self.tokenizer_source else tokenizer_revision(self.meta)
            self._tokenizer = load_tokenizer(source, revision=revision)
        return self._tokenizer

    @property
    def runner(self) -> PackageRunner:
        if self._runner is None:
            self._runner = PackageRunner(self._package, self.backend, function=self.meta["function"],
                                         compute_units=self.compute_units, use_cache=self.use_cache)
        return self._runner

    def run(self, texts: list[str], pairs: list[str | None] | None = None, prompt: str | None = None,
            labels: list[str] | None = None, top_k: int = 5, full: bool = False) -> dict:
        """Every text (with its pair, after the prompt) through the package: one result per text, and for an
        embed package the labels ranked (zero-shot) or the texts' similarity matrix. `full`: every value of
        an encoder or embed output (else the first few)."""
        if top_k < 1:
            raise UserError(f"--top-k must be at least 1 (got {top_k})")
        meta, texts = self.meta, list(texts)
        pairs = list(pairs) if pairs is not None else [None] * len(texts)
        inputs = apply_prompt(texts, prompt, meta, self.task)
        tokenizer, lengths = self.tokenizer, self.lengths
        seqs = [encode(tokenizer, text, f"text {i + 1}", lengths[-1], self.truncate, pair)
                for i, (text, pair) in enumerate(zip(inputs, pairs))]
        label_seqs = [encode(tokenizer, label, f"label '{label}'", lengths[-1], self.truncate) for label in labels or []]
        check_token_ids(seqs, meta.get("vocab_size"), self.package)
        check_token_ids(label_seqs, meta.get("vocab_size"), self.package, lambda i: f"label '{labels[i]}'")
        if self.task == "fill-mask":
            check_masks(seqs, tokenizer, meta)
        pad_id = special_token_id(tokenizer, meta, "pad")
        outs, predictions = run_all(self.runner, meta, seqs + label_seqs, lengths, pad_id, self.max_texts)
        results = [{"text": text, **({"pair": pair} if pair is not None else {}),
                    **({"prompt": prompt} if prompt else {}), "num_tokens": len(ids), "length": out["length"],
                    **task_result(self.task, out["rows"], ids, tokenizer, meta, tokenized, top_k, full)}
                   for text, tokenized, pair, ids, out in zip(texts, inputs, pairs, seqs, outs)]
        doc = {"package": self.package, "function": meta["function"], "task": self.task,
               "backend": self.runner.backend, "coreml_load": self.runner.load_report, "predictions": predictions,
               "results": results}
        if self.task == "embed":
            add_similarities(doc, np.stack([o["rows"] for o in outs]), labels)
        return doc

    # ---- one method per task (the Python API): the results, not the document

    def _expect(self, task: str) -> None:
        if self.task != task:
            raise UserError(f"{self.package} is a {self.task} package, not {task} "
                            f"(its functions: see `python predict.py --help`, --function)")

    def fill_mask(self, texts: list[str], top_k: int = 5) -> list[list[dict]]:
        """Per text, per [MASK]: the top_k tokens with their probabilities ({"token", "id", "probability"})."""
        self._expect("fill-mask")
        return [[m["predictions"] for m in r["masks"]] for r in self.run(texts, top_k=top_k)["results"]]

    def embed(self, texts: list[str], prompt: str | None = None) -> np.ndarray:
        """The texts' sentence embeddings, (N, D) float32."""
        self._expect("embed")
        results = self.run(texts, prompt=prompt, full=True)["results"]
        return np.array([r["embedding"] for r in results], dtype=np.float32).reshape(len(results), -1)

    def classify(self, texts: list[str], pairs: list[str] | None = None) -> list[list[dict]]:
        """Per text (and its pair): every label with its score ({"label", "score"}), best first."""
        self._expect("classify")
        return [r["labels"] for r in self.run(texts, pairs=pairs)["results"]]

    def token_classify(self, texts: list[str]) -> list[list[dict]]:
        """Per text: its words with their labels ({"word", "label", "score", ...})."""
        self._expect("token-classify")
        return [r["words"] for r in self.run(texts)["results"]]

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        """Per text: the encoder's last hidden states, (tokens, hidden) float32."""
        self._expect("encoder")
        return [np.asarray(r["hidden_states"], dtype=np.float32) for r in self.run(texts, full=True)["results"]]


def backend_line(described: str, texts: int, labels: int, predictions: int) -> str:
    """stderr's line on what ran: 'backend: float16 emulator (2 texts in 1 prediction)'."""
    ran = plural(texts, "text") + (f" and {plural(labels, 'label')}" if labels else "")
    return f"backend: {described} ({ran} in {plural(predictions, 'prediction')})"


def main(argv) -> int:
    args = build_parser().parse_args(argv)
    if args.top_k < 1:
        raise UserError(f"--top-k must be at least 1 (got {args.top_k})")
    predictor = Predictor(args.package, args.backend, args.function, args.tokenizer, args.compute_units,
                          not args.no_cache, args.pack, args.truncate)
    labels = parse_labels(args.labels, predictor.task)
    texts, pairs = split_pairs(read_texts(args), args.pair, predictor.task)
    doc = predictor.run(texts, pairs, args.prompt, labels, args.top_k, full=args.json)
    print(backend_line(predictor.runner.describe(), len(texts), len(labels or []), doc["predictions"]),
          file=sys.stderr)
    if args.json:
        print(json.dumps(doc, indent=2, ensure_ascii=False))
    else:
        mask = mask_name(predictor.tokenizer)
        print("\n".join(format_text(r, i, predictor.task, mask) for i, r in enumerate(doc["results"])))
        if "similarity" in doc:
            print(format_similarity(doc["similarity"]))
    return 0


def entry_point() -> None:
    """The console script (and `python predict.py`): main with one-line errors."""
    run_cli(main)


if __name__ == "__main__":
    entry_point()
