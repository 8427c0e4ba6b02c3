"""The Core ML side: what reads, runs and checks a saved package."""
