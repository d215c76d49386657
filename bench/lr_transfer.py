"""Learning-rate transfer across depth, from tools/sweep.py cells: loss against lr, one curve per
depth, with and without model.depth_scaling, and where the best lr holds.

    python bench/lr_transfer.py bench/results/lr_transfer --output bench/results/lr_transfer/transfer.md
    python bench/lr_transfer.py bench/results/lr_transfer --at-shallow-lr --output bench/results/lr_transfer/depth.md

Each cell's own config.yaml says its preset, lr and depth scaling (so the sweep's method names can
be anything). The loss is `final_eval_loss`, the same spread sample of the val split for every cell.
With depth scaling, a cell at L = base_layers is the very run without it (every rule is 1 there),
so the unscaled cells at that depth stand in the scaled curve too. "Transfers" at a depth means:
the best lr there is the best lr at the shallowest depth, or one grid step from it with the
shallow lr's loss within 0.02 nats of the best; "open" while the shallow best lr, or a grid
neighbour of the best lr there (which might be better still), has not run there.

--at-shallow-lr writes the other half of the experiment: every depth-scaled preset at the one lr
that was best at the shallowest depth, down to the deepest cell run at that lr, with the monitors'
verdict, and plots its loss against depth.
"""

import argparse
import collections
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.confounds import mean_spread, read_rows  # noqa: E402
from bench.depth_table import dynamics  # noqa: E402
from configs import saved_config  # noqa: E402
from launch.run_dir import RunDir  # noqa: E402
from tools.sweep import cell_dir, row_cell  # noqa: E402

TOLERANCE = 0.02


class Variant(collections.namedtuple("Variant", "preset alpha stack_norms")):
    """A curve's key: the preset and its depth scaling (alpha, and whether the stack-norm rule is on)."""

    def scaling(self):
        if not self.alpha:
            return "no depth scaling"
        return f"alpha = {self.alpha:g}" + (", stack-norm rule" if self.stack_norms else "")


def cells(directories):
    """{Variant: {depth: {lr: [(sweep directory, results.csv row) per seed]}}} of every finished
    cell, each placed by its own config.yaml."""
    from omegaconf import OmegaConf

    out = collections.defaultdict(lambda: collections.defaultdict(lambda: collections.defaultdict(list)))
    base = {}
    for directory in directories:
        for row in read_rows(directory):
            if row["final_eval_loss"] in ("", None) and row["status"] in ("ok", "stalled"):
                continue  # not finished
            cfg = saved_config(OmegaConf.load(RunDir(cell_dir(directory, row_cell(row))).config))
            scaling = cfg.model.depth_scaling
            key = Variant(row["method"].split("+")[0], scaling.alpha, bool(scaling.alpha and scaling.stack_norm_rule))
            out[key][cfg.model.n_layers][cfg.train.lr].append((directory, row))
            if key.alpha:
                base[key] = scaling.base_layers
    for key, at in base.items():  # the unscaled runs at L_base are the scaled runs there
        for lr, found in out.get(Variant(key.preset, 0.0, False), {}).get(at, {}).items():
            out[key][at].setdefault(lr, found)
    return out


def loss(row):
    """final_eval_loss of a cell that trained; NaN for one that diverged or failed."""
    return float(row["final_eval_loss"]) if row["status"] in ("ok", "stalled") else float("nan")


def curves(directories):
    """{Variant: {depth: {lr: [losses over seeds]}}} from every finished cell."""
    return {key: {depth: {lr: [loss(row) for _, row in found] for lr, found in by_lr.items()}
                  for depth, by_lr in by_depth.items()}
            for key, by_depth in cells(directories).items()}


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
    for key, by_depth in sorted(data.items()):
        grid = sorted({lr for by_lr in by_depth.values() for lr in by_lr})
        name = f"`{key.preset}`, " + ("depth scaling " if key.alpha else "") + key.scaling()
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


def at_shallow_lr(found):
    """(Variant, lr, {depth: [(directory, row)]}) of each depth-scaled preset at the lr best at its
    shallowest depth, at every depth that lr ran."""
    for key, by_depth in sorted(found.items()):
        lr = best({lr: [loss(row) for _, row in rows] for lr, rows in by_depth[min(by_depth)].items()})
        if key.alpha and lr is not None:
            yield key, lr, {d: by_depth[d][lr] for d in sorted(by_depth) if lr in by_depth[d]}


def depth_table(found):
    """Each depth-scaled preset at one lr, the best at its shallowest depth, not retuned with depth:
    per depth its final_eval_loss (mean ± half-range over seeds), how far below the unigram entropy,
    the deepest layer's cosine / stable rank / collapsed layers and the first layer's gradient norm
    over the last layer's at the end, one entry per seed."""
    lines = ["| preset | lr | layers | final_eval_loss | below the unigram entropy | deepest layer: cosine / "
             "stable rank / collapsed layers | gradient norm, first / last layer |", "|---|---|---|---|---|---|---|"]
    for key, lr, by_depth in at_shallow_lr(found):
        for depth, rows in by_depth.items():
            trained = [row for _, row in rows if loss(row) == loss(row)]
            losses = [loss(row) for row in trained]
            below = f"{float(trained[0]['unigram_entropy']) - mean(losses):.2f}" if trained else "–"
            state = "; ".join(f"{float(r['cos_sim_end']):.2f} / {float(r['stable_rank_end']):.1f} / "
                              f"{r['collapsed_layers_end']}" if loss(r) == loss(r) else r["status"]
                              for _, r in rows)
            grads = "; ".join(f"{dynamics(directory, r)[0]:.2g}" for directory, r in rows)
            lines.append(f"| `{key.preset}`, {key.scaling()} | {lr:g} | {depth} | "
                         f"{mean_spread(losses) if trained else 'x'} | {below} | {state} | {grads} |")
    return "\n".join(lines) + "\n"


def plot_depth(found, path):
    """final_eval_loss against depth, one line per depth-scaled preset at its shallow-best lr."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    depths = set()
    for key, lr, by_depth in at_shallow_lr(found):
        ax.plot(list(by_depth), [mean([loss(row) for _, row in rows]) for rows in by_depth.values()], marker="o",
                label=f"{key.preset}" + (", stack-norm rule" if key.stack_norms else "") + f", lr {lr:g}")
        depths |= set(by_depth)
    ax.set(xscale="log", xlabel="layers", ylabel="final_eval_loss", title="depth scaling, one lr per preset")
    ax.set_xticks(sorted(depths), [str(d) for d in sorted(depths)])  # the depths run, not log-scale decades
    ax.minorticks_off()
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(data, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(data)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.8), squeeze=False, sharey=True)
    for ax, key in zip(axes[0], keys):
        for depth, by_lr in sorted(data[key].items()):
            lrs = sorted(by_lr)
            ax.plot(lrs, [mean(by_lr[lr]) for lr in lrs], marker="o", label=f"{depth} layers")
        ax.set(xscale="log", xlabel="lr", ylabel="final_eval_loss",
               title=f"{key.preset}, {key.scaling()}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweeps", nargs="+", help="tools/sweep.py output directories")
    ap.add_argument("--output", required=True, help="the Markdown file to write; the plot goes beside it as .png")
    ap.add_argument("--at-shallow-lr", action="store_true",
                    help="write the depth table of each depth-scaled preset at its shallow-best lr, and its plot, instead")
    args = ap.parse_args(argv)
    if args.at_shallow_lr:
        found = cells(args.sweeps)
        text = depth_table(found)
        plot_depth(found, Path(args.output).with_suffix(".png"))
    else:
        data = curves(args.sweeps)
        text = tables(data)
        plot(data, Path(args.output).with_suffix(".png"))
    Path(args.output).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
