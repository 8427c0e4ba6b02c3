"""modernbert-ane: ModernBERT for the Apple Neural Engine (the Python API: `modernbert_ane.api`)."""

__version__ = "0.1.0"          # recorded in every package's metadata; pyproject.toml reads it
