"""`python convert.py ...`: the command line of modernbert_ane/convert.py (installed: modernbert-ane-convert)."""
from modernbert_ane.convert import entry_point

if __name__ == "__main__":
    entry_point()
