"""Learning-rate transfer across depth, from tools/sweep.py cells: loss against lr, one curve per
depth, with and without model.depth_scaling, and where the best lr holds.

    python bench/lr_transfer.py bench/results/lr_transfer --output bench/results/lr_transfer/transfer.md

Each cell's own config.yaml says its preset, lr and depth scaling (so the sweep's method names can
be anything). The loss is `final_eval_loss`, the same spread sample of the val split for every cell.
With depth scaling, a cell at L = base_layers is the very run without it (every rule is 1 there),
so the unscaled cells at that depth stand in the scaled curve too. "Transfers" at a depth means:
the best lr there is the best lr at the shallowest depth, or one grid step from it with the
shallow lr's loss within 0.02 nats of the best; "open" while the shallow best lr, or a grid
neighbour of the best lr there (which might be better still), has not run there.
"""

import argparse
import collections
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.confounds import read_rows  # noqa: E402
from configs import saved_config  # noqa: E402
from launch.run_dir import RunDir  # noqa: E402
from tools.sweep import cell_dir, row_cell  # noqa: E402

TOLERANCE = 0.02


def curves(directories):
    """{(preset, alpha): {depth: {lr: [losses over seeds]}}} from every finished cell."""
    from omegaconf import OmegaConf

    out = collections.defaultdict(lambda: collections.defaultdict(lambda: collections.defaultdict(list)))
    base = {}
    for directory in directories:
        for row in read_rows(directory):
            if row["final_eval_loss"] in ("", None):
                continue
            cfg = saved_config(OmegaConf.load(RunDir(cell_dir(directory, row_cell(row))).config))
            preset = row["method"].split("+")[0]
            alpha = cfg.model.depth_scaling.alpha
            loss = float(row["final_eval_loss"]) if row["status"] in ("ok", "stalled") else float("nan")
            out[preset, alpha][cfg.model.n_layers][cfg.train.lr].append(loss)
            if alpha:
                base[preset, alpha] = cfg.model.depth_scaling.base_layers
    for (preset, alpha), at in base.items():  # the unscaled runs at L_base are the scaled runs there
        for lr, losses in out.get((preset, 0.0), {}).get(at, {}).items():
            out[preset, alpha][at].setdefault(lr, losses)
    return out


def mean(values):
    return statistics.fmean(values) if values else float("nan")


def best(by_lr):
    finite = {lr: mean(v) for lr, v in by_lr.items() if mean(v) == mean(v)}
    return min(finite, key=finite.get) if finite else None


def transfers(by_depth, depth, grid):
    """"yes", "no", or "open" while the shallowest depth's best lr, or a grid neighbour of the best
    lr at `depth`, has not run at `depth`."""
    shallow = best(by_depth[min(by_depth)])
    here = best(by_depth[depth])
    if shallow is None or here is None:
        return "no"
    i = grid.index(here)
    if shallow not in by_depth[depth] or any(grid[j] not in by_depth[depth] for j in (i - 1, i + 1) if 0 <= j < len(grid)):
        return "open"
    loss_at_shallow = mean(by_depth[depth][shallow])
    near = abs(grid.index(here) - grid.index(shallow)) <= 1 and loss_at_shallow - mean(by_depth[depth][here]) <= TOLERANCE
    return "yes" if near else "no"


def tables(data):
    lines = []
    for (preset, alpha), by_depth in sorted(data.items()):
        grid = sorted({lr for by_lr in by_depth.values() for lr in by_lr})
        name = f"`{preset}`, " + (f"depth scaling alpha = {alpha:g}" if alpha else "no depth scaling")
        lines += [f"**{name}** (final_eval_loss; mean over seeds; `–` not run, `x` diverged or failed)", "",
                  "| layers | " + " | ".join(f"lr {lr:g}" for lr in grid) + " | best lr | transfers from the shallowest |",
                  "|---|" + "---|" * (len(grid) + 2)]
        for depth in sorted(by_depth):
            by_lr = by_depth[depth]
            cells = []
            for lr in grid:
                m = mean(by_lr.get(lr, []))
                text = "–" if lr not in by_lr else "x" if m != m else f"{m:.3f}"
                cells.append(f"**{text}**" if lr == best(by_lr) else text)
            verdict = "–" if depth == min(by_depth) else transfers(by_depth, depth, grid)
            best_lr = f"{best(by_lr):g}" if best(by_lr) else "–"
            lines.append(f"| {depth} | " + " | ".join(cells) + f" | {best_lr} | {verdict} |")
        lines.append("")
    return "\n".join(lines)


def plot(data, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(data)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.8), squeeze=False, sharey=True)
    for ax, key in zip(axes[0], keys):
        preset, alpha = key
        for depth, by_lr in sorted(data[key].items()):
            lrs = sorted(by_lr)
            ax.plot(lrs, [mean(by_lr[lr]) for lr in lrs], marker="o", label=f"{depth} layers")
        ax.set(xscale="log", xlabel="lr", ylabel="final_eval_loss",
               title=f"{preset}, " + (f"alpha = {alpha:g}" if alpha else "no depth scaling"))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweeps", nargs="+", help="tools/sweep.py output directories")
    ap.add_argument("--output", required=True, help="the Markdown file to write; the plot goes beside it as .png")
    args = ap.parse_args(argv)
    data = curves(args.sweeps)
    text = tables(data)
    Path(args.output).write_text(text)
    plot(data, Path(args.output).with_suffix(".png"))
    print(text)


if __name__ == "__main__":
    main()
