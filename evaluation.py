"""What the accuracy reports share: the evaluation texts, the transformers reference, the metrics,
and the tables. Used by diff_torch.py and diff_coreml.py (and, for texts, by the tests)."""
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from checkpoint import Checkpoint, CheckpointError, check_weight_files, is_hub_id, read_json
from model import POOLED_TASKS
from user_errors import UserError, writing

# Short sentences and passages longer than the 128-token local window of the released checkpoints,
# so both the global and the sliding-window layers, and padding in a batch, are exercised.
EVAL_TEXTS = [
    "The capital of France is [MASK].",
    "Paris is the capital and largest city of France.",
    "She poured the coffee, opened the window and sat down to read the morning paper.",
    "A neural network learns its weights from data by gradient descent.",
    "The meeting was moved to Thursday because half of the team was travelling.",
    "Water boils at one hundred degrees Celsius at sea level.",
    ("The river rises in the hills north of the town and runs south through farmland for most of its length. "
     "In the spring the snow melts quickly and the water climbs over its banks, flooding the low fields beside "
     "the old mill. Farmers learned long ago to plant late in those fields, after the water has gone down, and "
     "to keep their animals on the higher ground until the end of April. The mill itself was built more than "
     "two hundred years ago and ground wheat and barley for the villages around it until the railway arrived. "
     "After that, grain was sent by train to the large mills in the city, and the wheel stopped turning. "
     "Today the building is a small museum, and on Sundays volunteers open the sluice gate so that visitors can "
     "watch the wheel move again. Children are allowed to pour a handful of grain into the hopper and see it "
     "come out as flour, which they take home in paper bags printed with a drawing of the mill. The museum also "
     "keeps the account books of the last miller, who wrote down every sack that passed through his hands, the "
     "name of the farmer who brought it and the price he was paid, in a neat hand that is still easy to read."),
    ("Modern computers store numbers in a fixed number of bits, and every format trades range against "
     "precision. A sixteen bit floating point number has five bits of exponent and ten bits of fraction, so it "
     "can represent values up to about sixty five thousand with roughly three decimal digits of precision. That "
     "is enough for many of the values a neural network computes, such as the output of a normalisation layer "
     "or the probabilities of a softmax, but it is not enough for every intermediate result. When a model "
     "produces a few very large activations, squaring them to compute a variance overflows the format and the "
     "result becomes infinite. Small updates added to a large value are also lost, because the spacing between "
     "neighbouring representable numbers grows with their size. Engineers who move models to such hardware "
     "therefore study where large values appear, rewrite the operations that are sensitive to them, and check "
     "the converted model against the original on real text before they ship it. A careful comparison reports "
     "how far the predicted distributions moved, how often the most likely token changed, and which layer "
     "first produced a value that the format could not hold."),
    ("The library opened at nine, but the queue began to form long before that. Students with laptops under "
     "their arms, retired teachers with shopping bags full of returned novels, and a few tourists who had read "
     "about the painted ceiling waited on the steps in the cold. When the doors finally opened, everyone went "
     "in different directions: the students to the quiet reading room on the second floor, the teachers to the "
     "returns desk, and the tourists straight to the centre of the main hall, where they tipped their heads "
     "back and looked up at the ceiling for a long time without saying anything. The painting shows the four "
     "seasons as four women walking around the edge of a garden, each carrying something different: flowers, "
     "a sheaf of wheat, a basket of apples and a lantern. The artist worked on it for three years, lying on his "
     "back on a wooden platform, and according to the guide he fell off twice."),
]


def load_tokenizer(source: str, tasks=(), revision: str | None = None):
    """A tokenizer (hub id or folder) with what ModernBERT needs: [CLS], [SEP] and [PAD] ([MASK] too when
    `tasks` has fill-mask), put around every text as [CLS] ... [SEP]; a one-line error otherwise.
    `revision`: the hub commit (or branch, tag) of a hub id; None: its main branch."""
    import transformers
    transformers.utils.logging.set_verbosity_error()      # no "sequence longer than model_max_length" chatter
    name = str(source)
    if not Path(name).expanduser().exists() and ("/" in name or name.startswith(("~", "."))) and not is_hub_id(name):
        raise CheckpointError(f"no such tokenizer folder: {name}; pass --tokenizer with the model's tokenizer "
                              f"(a hub id or folder)")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(name, **({"revision": revision} if revision else {}))
    except Exception as e:
        if isinstance(e, UnicodeDecodeError) and Path(name).is_dir():
            for file in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
                if (Path(name) / file).is_file():
                    read_json(Path(name) / file)                # names the file that is not UTF-8
        reason = " ".join(str(e).split())[:200]
        raise CheckpointError(f"cannot load a tokenizer from '{source}' ({type(e).__name__}: {reason}); "
                              f"pass --tokenizer with a hub id or folder that has the model's tokenizer") from e
    needed = ["cls_token", "sep_token", "pad_token"] + (["mask_token"] if "fill-mask" in tasks else [])
    missing = [t for t in needed if getattr(tokenizer, t, None) is None]
    if missing:
        why = " (a fill-mask package needs it)" if missing == ["mask_token"] else ""
        raise CheckpointError(f"the tokenizer from {source} has no {', '.join(missing)}{why}; "
                              f"use the model's own tokenizer")
    ids = tokenizer("a")["input_ids"]
    if not ids or ids[0] != tokenizer.cls_token_id or ids[-1] != tokenizer.sep_token_id:
        raise CheckpointError(f"the tokenizer from {source} does not put [CLS] and [SEP] around a text "
                              f"({tokenizer.cls_token} ... {tokenizer.sep_token}), as ModernBERT expects; "
                              f"use the model's own tokenizer")
    return tokenizer


def tokenize(tokenizer, texts: list[str], max_length: int, fixed_length: bool = False):
    """(input_ids, attention_mask), int64 (B, S): truncated to max_length, padded to the longest text or,
    with `fixed_length` (a package's fixed input shape), to max_length."""
    enc = tokenizer(list(texts), padding="max_length" if fixed_length else "longest", truncation=True,
                    max_length=max_length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def reference_model(ckpt: Checkpoint, task: str):
    """transformers' own ModernBERT for the same checkpoint and task, float32, eager attention."""
    import transformers
    transformers.utils.logging.disable_progress_bar()
    classes = {"fill-mask": "ModernBertForMaskedLM", "encoder": "ModernBertModel", "embed": "ModernBertModel",
               "classify": "ModernBertForSequenceClassification",
               "token-classify": "ModernBertForTokenClassification"}
    cls = getattr(transformers, classes[task])
    check_weight_files(ckpt.path, ckpt.allow_pickle)            # pickles only when allowed; truncated files
    transformers.utils.logging.set_verbosity_error()            # its load report: we say what is wrong
    try:
        model, info = cls.from_pretrained(str(ckpt.path), attn_implementation="eager", dtype=torch.float32,
                                          output_loading_info=True, ignore_mismatched_sizes=True)
    except Exception as e:
        raise CheckpointError(f"transformers cannot load {ckpt.path} as {classes[task]}: {e}") from e
    missing = sorted(info.get("missing_keys") or [])            # transformers would fill them with random values
    mismatched = sorted(f"{k[0]} {tuple(k[1])} (expected {tuple(k[2])})" if isinstance(k, tuple) else str(k)
                        for k in info.get("mismatched_keys") or [])
    if missing or mismatched:
        raise CheckpointError(f"weights in {ckpt.path} do not match {classes[task]}: "
                              + "; ".join(([f"missing {', '.join(missing[:5])}"] if missing else []) +
                                          ([f"shape of {', '.join(mismatched[:5])}"] if mismatched else [])))
    return model.eval()


def sentence_embeddings(ckpt: Checkpoint, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """sentence-transformers' semantics on transformers' last hidden state (B, S, C) -> (B, D): the
    folder's Pooling (cls or masked mean), Dense layers (activation(linear)) and Normalize, as
    sentence_transformers.models computes them; a plain checkpoint pools by its classifier_pooling."""
    from checkpoint import load_state_dict
    modules = sorted(ckpt.modules, key=lambda m: int(m.get("idx", 0))) or [
        {"type": "Pooling", "pooling": ckpt.config.get("classifier_pooling", "cls")}]
    x = hidden
    for module in modules:
        kind = module["type"].rsplit(".", 1)[-1]
        folder = ckpt.root / module.get("path", "")
        if kind == "Pooling":
            cfg = read_json(folder / "config.json") if "pooling" not in module else {}
            if module.get("pooling") == "cls" or cfg.get("pooling_mode_cls_token"):
                x = x[:, 0]
            else:
                m = attention_mask.to(x.dtype).unsqueeze(-1)
                x = (x * m).sum(1) / m.sum(1).clamp(min=1e-9)
        elif kind == "Dense":
            cfg = read_json(folder / "config.json")
            w = load_state_dict(folder)
            act = cfg.get("activation_function", "torch.nn.modules.activation.Tanh").rsplit(".", 1)[-1]
            x = getattr(torch.nn, act)()(torch.nn.functional.linear(x, w["linear.weight"], w.get("linear.bias")))
        elif kind == "Normalize":
            x = torch.nn.functional.normalize(x, p=2, dim=1)
    return x


def reference_outputs(ref, task: str, input_ids, attention_mask, ckpt: Checkpoint | None = None) -> dict:
    """The reference's task output and its intermediates, all as float32 (B, S, C) arrays:
    'embeddings', 'layers.i', 'encoder' (final norm output), 'output' (the task output; (B, L) or (B, D)
    for pooled tasks). `ckpt` is needed for embed (its sentence-transformers modules)."""
    base = ref if task in ("encoder", "embed") else ref.model
    captured = {}
    hooks = [base.embeddings.register_forward_hook(lambda m, i, o: captured.__setitem__("embeddings", o)),
             base.final_norm.register_forward_hook(lambda m, i, o: captured.__setitem__("encoder", o))]
    for idx, layer in enumerate(base.layers):
        hooks.append(layer.register_forward_hook(
            lambda m, i, o, idx=idx: captured.__setitem__(f"layers.{idx}", o[0] if isinstance(o, tuple) else o)))
    try:
        with torch.no_grad():
            out = ref(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        for h in hooks:
            h.remove()
    if task == "embed":
        with torch.no_grad():
            captured["output"] = sentence_embeddings(ckpt, out.last_hidden_state, attention_mask)
    else:
        captured["output"] = out.last_hidden_state if task == "encoder" else out.logits
    return {k: v.detach().float().numpy() for k, v in captured.items()}


# ----------------------------------------------------------------------------- metrics

def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def distribution_metrics(ref_logits: np.ndarray, logits: np.ndarray) -> dict:
    """KL(reference || ours) in nats per row, and top-1/top-5 agreement, over rows (N, V).
    top5_agreement is the mean overlap of the two top-5 sets (1.0: same five tokens)."""
    finite = np.isfinite(logits).all(axis=-1)
    kl = kl_per_row(ref_logits, logits)
    k = min(5, ref_logits.shape[-1])
    top_ref, top = np.argsort(-ref_logits, axis=-1)[:, :k], np.argsort(-logits, axis=-1)[:, :k]
    overlap = np.array([len(set(a) & set(b)) / k for a, b in zip(top_ref, top)])
    return {"kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "top1_agreement": float(((top_ref[:, 0] == top[:, 0]) & finite).mean()),
            "top5_agreement": float(np.where(finite, overlap, 0.0).mean())}


def kl_per_row(ref_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """KL(reference || ours) in nats of each row (N, V); inf for a row with a non-finite logit."""
    finite = np.isfinite(logits).all(axis=-1)
    lp_ref, lp = _log_softmax(ref_logits), _log_softmax(np.where(np.isfinite(logits), logits, 0.0))
    kl = (np.exp(lp_ref) * (lp_ref - lp)).sum(axis=-1)
    return np.where(finite, kl, np.inf)                        # a row with a non-finite logit is infinitely wrong


def cosine_per_row(ref: np.ndarray, ours: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row (N, C); non-finite values of ours count as 0."""
    ref, ours = ref.astype(np.float64), np.nan_to_num(ours.astype(np.float64), posinf=0.0, neginf=0.0)
    return (ref * ours).sum(-1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(ours, axis=-1) + 1e-30)


def cosine_metrics(ref: np.ndarray, ours: np.ndarray) -> dict:
    """Cosine similarity per row (N, C)."""
    cos = cosine_per_row(ref, ours)
    return {"cosine_min": float(cos.min()), "cosine_mean": float(cos.mean())}


COSINE_TASKS = ("encoder", "embed")              # compared by cosine (output_metrics), the rest by KL


def text_disagreement(task: str, ref: np.ndarray, ours: np.ndarray, mask: np.ndarray) -> list:
    """Per text, for reports: KL(reference || ours) per non-padding token (or 1 - cosine for encoder/embed)
    of (B, S, C) outputs, or one value per text of pooled (B, L) ones."""
    def per_row(r, o):
        return 1 - cosine_per_row(r, o) if task in COSINE_TASKS else kl_per_row(r, o)
    if task in POOLED_TASKS:
        return [per_row(ref[i:i + 1], ours[i:i + 1]) for i in range(len(ref))]
    return [per_row(r[m.astype(bool)], o[m.astype(bool)]) for r, o, m in zip(ref, ours, mask)]


def output_metrics(task: str, ref: np.ndarray, ours: np.ndarray, attention_mask: np.ndarray) -> dict:
    """The final metrics for a task output, over non-padding tokens (or per text for classify)."""
    if task in POOLED_TASKS:
        rows_ref, rows = ref, ours
    else:
        valid = attention_mask.astype(bool)
        rows_ref, rows = ref[valid], ours[valid]
    metrics = {"max_abs_diff": float(np.nan_to_num(np.abs(rows - rows_ref), nan=np.inf).max()),
               "nonfinite": int((~np.isfinite(ours)).sum())}
    if task in COSINE_TASKS:
        metrics.update(cosine_metrics(rows_ref, rows))
    else:
        metrics.update(distribution_metrics(rows_ref, rows))
    return metrics


def compare_rows(name: str, ref: np.ndarray, ours: np.ndarray, attention_mask: np.ndarray) -> dict:
    """One line of the per-module table: differences over non-padding tokens of (B, S, C) arrays."""
    valid = attention_mask.astype(bool)
    r, o = ref[valid].astype(np.float64), ours[valid].astype(np.float64)
    diff = np.nan_to_num(np.abs(o - r), nan=np.inf)
    scale = np.abs(r).max() or 1.0
    return {"module": name, "max_abs_diff": float(diff.max()), "rel_diff": float(diff.max() / scale),
            "cosine_min": cosine_metrics(r, o)["cosine_min"], "max_abs_ref": float(np.abs(r).max()),
            "max_abs": float(np.nan_to_num(np.abs(o), nan=np.inf).max())}


def overflow_metrics(probe) -> dict:
    """float16 overflow counts from a model.ActivationProbe."""
    return {"overflow_count": int(probe.overflow_count), "first_overflow": probe.first_overflow}


# ----------------------------------------------------------------------------- reports

def format_table(rows: list[dict], columns: list[str]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.3e}" if (v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e5)) else f"{v:.4f}"
        return str(v)
    cells = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def format_metrics(metrics: dict) -> str:
    keys = [k for k in ("kl_mean", "kl_max", "top1_agreement", "top5_agreement", "cosine_min", "cosine_mean",
                        "max_abs_diff", "nonfinite", "overflow_count", "first_overflow") if k in metrics]
    return "\n".join(f"  {k:<15} {metrics[k]}" for k in keys)


def check_output_path(path: str | None, force: bool, inside=(), folder: bool = False) -> None:
    """Checked before any slow work: refuse to overwrite an existing output without --force, to write inside
    one of the inputs (`inside`: the folders read), into a folder that does not exist, or (unless the
    output is itself a folder, an .mlpackage) over a folder."""
    if not path:
        return
    target = Path(path)
    for source in inside:
        if source and Path(source).exists() and target.resolve().is_relative_to(Path(source).resolve()):
            raise UserError(f"{path} is inside the input {source}; write it elsewhere")
    if target.exists() and not force:
        raise UserError(f"{path} exists; pass --force to overwrite it")
    if target.is_dir() and not folder:
        raise UserError(f"{path} is a folder; give the name of a file to write")
    if not target.parent.is_dir():
        raise UserError(f"cannot write {path}: folder {target.parent} does not exist")


def write_json(path: str, data: dict) -> None:
    """Write atomically: a temporary file beside the target, renamed over it."""
    target = Path(path)
    if not target.parent.is_dir():
        raise UserError(f"cannot write {path}: folder {target.parent} does not exist")
    with writing(path):                                         # a full disk: one line, no temporary left
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=2, sort_keys=True, allow_nan=True)
                f.write("\n")
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
