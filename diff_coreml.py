"""`python diff_coreml.py ...`: the command line of modernbert_ane/diff_coreml.py (installed: modernbert-ane-diff-coreml)."""
from modernbert_ane.diff_coreml import entry_point

if __name__ == "__main__":
    entry_point()
