"""One module per metric; the shared machinery lives in ``metrics/_utils.py``."""
