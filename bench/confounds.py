"""The confound table: each change to a preset, its val loss (mean and spread over seeds) on each
corpus, and the deepest layer's cosine and stable rank; from the cells of tools/sweep.py runs.

    python bench/confounds.py --corpus bytes=bench/results/confounds_bytes \
        --corpus fortunes=bench/results/confounds_fortunes --output bench/results/confounds.md

A row is a sweep method: a preset (its defaults) or `preset+key=value` (that preset with one
change). Rows follow the order of the first corpus's results.csv.
"""

import argparse
import csv
import statistics
from pathlib import Path


def read_rows(directory):
    with open(Path(directory) / "results.csv") as f:
        return [r for r in csv.DictReader(f) if r["final_val_loss"]]


def mean_spread(values):
    """'mean ± half-range (n)' of a list of floats; one value alone has no spread."""
    if not values:
        return "–"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.3f} (1 seed)"
    return f"{mean:.3f} ± {(max(values) - min(values)) / 2:.3f}"


def table(corpora):
    rows = {name: read_rows(directory) for name, directory in corpora}
    methods = list(dict.fromkeys(r["method"] for name in rows for r in rows[name]))
    header = ["preset / change"]
    for name, _ in corpora:
        header += [f"{name}: val loss", f"{name}: cos / stable rank (deepest)", f"{name}: collapsed layers"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in methods:
        cells = [f"`{method}`"]
        for name, _ in corpora:
            mine = [r for r in rows[name] if r["method"] == method]
            val = [float(r["final_val_loss"]) for r in mine]
            cos = "; ".join(f"{float(r['cos_sim_end']):.2f} / {float(r['stable_rank_end']):.1f}" for r in mine) or "–"
            collapsed = "; ".join(r["collapsed_layers_end"] for r in mine) or "–"
            cells += [mean_spread(val), cos, collapsed]
        lines.append("| " + " | ".join(cells) + " |")
    unigram = {name: rows[name][0]["unigram_entropy"] for name in rows if rows[name]}
    note = ", ".join(f"{name} {float(u):.3f}" for name, u in unigram.items())
    return "\n".join(lines) + f"\n\nUnigram entropy (nats per byte): {note}. Seeds per cell separated by `;`.\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", action="append", required=True, help="NAME=SWEEP_OUTPUT_DIR, repeatable")
    ap.add_argument("--output", required=True, help="the Markdown file to write")
    args = ap.parse_args(argv)
    corpora = [tuple(c.split("=", 1)) for c in args.corpus]
    text = table(corpora)
    Path(args.output).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
