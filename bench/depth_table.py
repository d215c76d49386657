"""The depth tables of a tools/sweep.py run: per method and depth, the val loss (mean and spread
over seeds) and how far below the unigram entropy it ends; then the deepest layer's cosine and
stable rank and the number of collapsed layers at the end, one entry per seed; then what the
training did, from each cell's own logs: the first layer's gradient norm relative to the last
layer's at the end, and the validation loss at each evaluation.

    python bench/depth_table.py bench/results/sweep_bytes --output bench/results/sweep_bytes/depth_tables.md

A depth that a method has not run yet reads `–`; rows follow the order of results.csv.
"""

import argparse
import functools
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.confounds import mean_spread, read_rows  # noqa: E402
from launch.run_dir import RunDir, read_jsonl  # noqa: E402
from tools.sweep import cell_dir, row_cell  # noqa: E402


def dynamics(directory, row):
    """(first-layer / last-layer gradient norm at the last monitor step, the validation losses in
    step order). A ratio far below 1 is the post-norm signature of gradients vanishing on their way
    down; the validation losses tell a stalled run from a slow one."""
    run = RunDir(cell_dir(directory, row_cell(row)))
    layers = read_jsonl(run.monitors)[-1]["layers"]
    return (layers[0]["grad_norm"] / layers[-1]["grad_norm"],
            [r["val_loss"] for r in read_jsonl(run.metrics) if "val_loss" in r])


def tables(directory):
    rows = read_rows(directory)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    depths = sorted({int(r["depth"]) for r in rows})
    unigram = float(rows[0]["unigram_entropy"])
    head = "| method | " + " | ".join(f"{d} layers" for d in depths) + " |\n|" + "---|" * (len(depths) + 1)
    loss, collapse, training = [head], [head], [head]
    for method in methods:
        cells = {d: [r for r in rows if r["method"] == method and int(r["depth"]) == d] for d in depths}
        val = {d: [float(r["final_val_loss"]) for r in mine] for d, mine in cells.items()}
        loss.append(f"| `{method}` | " + " | ".join(
            f"{mean_spread(v)}, {unigram - statistics.fmean(v):.2f} below" if v else "–" for v in val.values()) + " |")
        collapse.append(f"| `{method}` | " + " | ".join("; ".join(
            f"{float(r['cos_sim_end']):.2f} / {float(r['stable_rank_end']):.1f} / {r['collapsed_layers_end']}"
            for r in mine) or "–" for mine in cells.values()) + " |")
        training.append(f"| `{method}` | " + " | ".join("; ".join(
            "{:.2g} / {}".format(ratio, " → ".join(f"{v:.2f}" for v in val))
            for ratio, val in map(functools.partial(dynamics, directory), mine)) or "–" for mine in cells.values()) + " |")
    return (f"Final validation loss (nats per byte; mean ± half the range over seeds) and how far it ends below "
            f"the unigram entropy ({unigram:.3f}):\n\n" + "\n".join(loss) +
            "\n\nDeepest layer at the end: token cosine / stable rank / collapsed layers (cosine ≥ "
            "monitor.collapse_threshold or stable rank ≤ monitor.stable_rank_threshold), one entry per seed:\n\n" +
            "\n".join(collapse) +
            "\n\nTraining, one entry per seed: the first layer's gradient norm over the last layer's at the end "
            "(monitor grad_norm) / the validation loss at each evaluation:\n\n" + "\n".join(training) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep", help="a tools/sweep.py output directory (its results.csv)")
    ap.add_argument("--output", required=True, help="the Markdown file to write")
    args = ap.parse_args(argv)
    text = tables(args.sweep)
    Path(args.output).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
