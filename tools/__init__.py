"""What a finished run is used for, and the sweeps that make many: evaluate.py, sample.py, export.py
(pretrained.py and hf/ are what they share with `from tools.pretrained import from_pretrained`), and
sweep.py."""
