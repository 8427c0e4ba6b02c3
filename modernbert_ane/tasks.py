"""The tasks a package can serve: one record each, the only place a task's facts live.

Torch-free, so predict.py and the package reader read it without loading model.py. Adding a task head:
a record here, its head in model.py (`ModernBert.__init__` / `forward`), its result and text block in
predict.py (`task_result`, `format_text`), and a test checkpoint (`tests/checkpoints.py` reads `hf_class`).
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    name: str                   # the CLI's --task value and the metadata's "task"
    hf_class: str               # transformers' class: the float32 reference and the test checkpoints
    output: str                 # the package's output name (a multi-task package's functions share it)
    description: str            # the output's description in the package
    pooled: bool                # one output row per text (pooled), else one per token
    compared_by: str            # "cosine" (vectors) or "kl" (distributions; a one-label head: its score error)
    architectures: tuple = ()   # checkpoint `architectures` whose default task this is

    @property
    def function(self) -> str:
        """The function's name in a multi-function package (MIL names cannot hold '-')."""
        return self.name.replace("-", "_")


SPECS = {t.name: t for t in (
    Task("fill-mask", "ModernBertForMaskedLM", "logits",
         "masked-LM logits over the vocabulary, (1, S, vocab)", pooled=False, compared_by="kl",
         architectures=("ModernBertForMaskedLM",)),
    Task("encoder", "ModernBertModel", "hidden_states",
         "last hidden states (after the final norm), (1, S, hidden)", pooled=False, compared_by="cosine",
         architectures=("ModernBertModel",)),
    Task("classify", "ModernBertForSequenceClassification", "logits",
         "sequence classification logits, (1, K, labels): one row per packed text; labels in the metadata",
         pooled=True, compared_by="kl", architectures=("ModernBertForSequenceClassification",)),
    Task("token-classify", "ModernBertForTokenClassification", "logits",
         "per-token classification logits, (1, S, labels); labels in the metadata", pooled=False,
         compared_by="kl", architectures=("ModernBertForTokenClassification",)),
    # a sentence-transformers folder: transformers' encoder, then the folder's pooling / dense / normalize
    Task("embed", "ModernBertModel", "embeddings",
         "sentence embeddings (pooling, dense, normalization included), (1, K, dim): one row per packed text",
         pooled=True, compared_by="cosine"),
)}

# views of SPECS, for the modules that only need one fact
TASKS = tuple(SPECS)
POOLED_TASKS = tuple(t.name for t in SPECS.values() if t.pooled)
COSINE_TASKS = tuple(t.name for t in SPECS.values() if t.compared_by == "cosine")
OUTPUT_NAMES = {t.name: t.output for t in SPECS.values()}
ARCHITECTURE_TASKS = {arch: t.name for t in SPECS.values() for arch in t.architectures}
