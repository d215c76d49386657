"""Turn a run's monitors.jsonl into PNGs: each metric vs depth at chosen steps, and a layer × step heatmap.

    python -m monitors.plot --run OUT_DIR [--steps 0,500,1000] [--metrics cos_sim,stable_rank] [--output DIR]

Writes DIR/<metric>_vs_depth.png and DIR/<metric>_heatmap.png (DIR defaults to OUT_DIR/plots).
"""

import argparse
import sys
from pathlib import Path

from launch.run_dir import RunDir, read_jsonl

DEFAULT_METRICS = "cos_sim,t_sim,stable_rank,rms,attn_sigma_ratio,grad_norm,update_ratio"
# metrics with a natural range get a fixed colour scale, so that panels and steps compare
FIXED_RANGES = {"cos_sim": (0, 1), "t_sim": (0, 1), "attn_sigma_ratio": (0, 1)}
# a rank falls from ~d at init towards 1: on a linear scale 1.1 (collapsed) and 3 look alike
LOG_SCALE = {"stable_rank", "stable_rank4"}


def metric_grid(history, metric):
    """[layers, monitor steps] array of one metric (NaN where a step lacks it), and the steps."""
    import numpy as np

    steps = [r["step"] for r in history]
    grid = np.full((len(history[0]["layers"]), len(history)), np.nan) if history else np.zeros((0, 0))
    for j, r in enumerate(history):
        for layer in r["layers"]:
            value = layer.get(metric)
            if value is not None:
                grid[layer["layer"], j] = sum(value) / len(value) if isinstance(value, list) else value
    return grid, steps


def draw_heatmap(ax, grid, steps, metric, value_range=None):
    """A layer × step grid on ax (layer 0 at the bottom); panels that share a colour bar pass their
    common value_range."""
    from matplotlib.colors import LogNorm, Normalize

    vmin, vmax = value_range or FIXED_RANGES.get(metric, (None, None))
    norm = (LogNorm if metric in LOG_SCALE else Normalize)(vmin, vmax)
    extent = (steps[0], steps[-1] if len(steps) > 1 else steps[0] + 1, -0.5, grid.shape[0] - 0.5)
    return ax.imshow(grid, aspect="auto", origin="lower", interpolation="nearest", cmap="viridis", extent=extent,
                     norm=norm)


def heatmap_figure(history, metric, title):
    """A labelled layer × step heatmap with its colour bar, or None when the metric was not recorded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid, steps = metric_grid(history, metric)
    if grid.size == 0 or np.isnan(grid).all():
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    fig.colorbar(draw_heatmap(ax, grid, steps, metric), ax=ax, label=metric)
    ax.set(xlabel="step", ylabel="layer", title=title)
    fig.tight_layout()
    return fig


def plot_run(run, steps=None, metrics=DEFAULT_METRICS.split(","), output=None, title=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    history = read_jsonl(RunDir(run).monitors)
    if not history:
        raise FileNotFoundError(f"{run} has no monitors.jsonl records: train with monitor.every > 0")
    output = Path(output or Path(run) / "plots")
    output.mkdir(parents=True, exist_ok=True)
    recorded = [r["step"] for r in history]
    steps = steps or sorted({recorded[0], recorded[len(recorded) // 2], recorded[-1]})
    title = title or Path(run).name
    written = []
    for metric in metrics:
        grid, grid_steps = metric_grid(history, metric)
        if np.isnan(grid).all():
            continue
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for step in steps:
            if step in grid_steps:
                ax.plot(grid[:, grid_steps.index(step)], label=f"step {step}")
        ax.set(xlabel="layer", ylabel=metric, title=f"{title}: {metric} vs depth")
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(output / f"{metric}_vs_depth.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

        fig = heatmap_figure(history, metric, f"{title}: {metric}")
        written.append(output / f"{metric}_heatmap.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a run directory (train.out_dir)")
    ap.add_argument("--steps", help="comma-separated monitor steps for the vs-depth plots (default: first, middle, last)")
    ap.add_argument("--metrics", default=DEFAULT_METRICS)
    ap.add_argument("--output", help="folder for the PNGs (default: RUN/plots)")
    ap.add_argument("--title")
    args = ap.parse_args(argv)
    try:
        written = plot_run(args.run, [int(s) for s in args.steps.split(",")] if args.steps else None,
                           args.metrics.split(","), args.output, args.title)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print("\n".join(map(str, written)))


if __name__ == "__main__":
    main()
