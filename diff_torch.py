"""`python diff_torch.py ...`: the command line of modernbert_ane/diff_torch.py (installed: modernbert-ane-diff-torch)."""
from modernbert_ane.diff_torch import entry_point

if __name__ == "__main__":
    entry_point()
