"""modernbert-ane: ModernBERT for the Apple Neural Engine."""
