"""The depth tables of a launch/sweep.py run: per method and depth, the val loss (mean and spread
over seeds) and how far below the unigram entropy it ends; then the deepest layer's cosine and
stable rank and the number of collapsed layers at the end, one entry per seed.

    python bench/depth_table.py bench/results/sweep_bytes --output bench/results/sweep_bytes/depth_tables.md

A depth that a method has not run yet reads `–`; rows follow the order of results.csv.
"""

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.confounds import mean_spread, read_rows  # noqa: E402


def tables(directory):
    rows = read_rows(directory)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    depths = sorted({int(r["depth"]) for r in rows})
    unigram = float(rows[0]["unigram_entropy"])
    head = "| method | " + " | ".join(f"{d} layers" for d in depths) + " |\n|" + "---|" * (len(depths) + 1)
    loss, collapse = [head], [head]
    for method in methods:
        cells = {d: [r for r in rows if r["method"] == method and int(r["depth"]) == d] for d in depths}
        val = {d: [float(r["final_val_loss"]) for r in mine] for d, mine in cells.items()}
        loss.append(f"| `{method}` | " + " | ".join(
            f"{mean_spread(v)}, {unigram - statistics.fmean(v):.2f} below" if v else "–" for v in val.values()) + " |")
        collapse.append(f"| `{method}` | " + " | ".join("; ".join(
            f"{float(r['cos_sim_end']):.2f} / {float(r['stable_rank_end']):.1f} / {r['collapsed_layers_end']}"
            for r in mine) or "–" for mine in cells.values()) + " |")
    return (f"Final validation loss (nats per byte; mean ± half the range over seeds) and how far it ends below "
            f"the unigram entropy ({unigram:.3f}):\n\n" + "\n".join(loss) +
            "\n\nDeepest layer at the end: token cosine / stable rank / collapsed layers (cosine ≥ "
            "monitor.collapse_threshold or stable rank ≤ monitor.stable_rank_threshold), one entry per seed:\n\n" +
            "\n".join(collapse) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep", help="a launch/sweep.py output directory (its results.csv)")
    ap.add_argument("--output", required=True, help="the Markdown file to write")
    args = ap.parse_args(argv)
    text = tables(args.sweep)
    Path(args.output).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
