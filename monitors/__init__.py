"""Per-depth collapse monitors: the metrics (metrics.py), the monitor that records them while
training (collapse.py), the probe of a model at init or from a run (probe.py) and their heatmaps
(plot.py). They sit above the trainer's run directory and below the tools: configs → data → model
→ launch → monitors → tools (tests/test_layers.py)."""
