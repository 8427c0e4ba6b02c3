"""`python predict.py ...`: the command line of modernbert_ane/predict.py (installed: modernbert-ane-predict)."""
from modernbert_ane.predict import entry_point

if __name__ == "__main__":
    entry_point()
