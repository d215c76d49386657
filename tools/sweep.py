"""Scaling-depth experiments: every method × depth (× init × seed) through train.py, then one table and plots.

    python tools/sweep.py --config configs/sweeps/bytes.yaml --depths 12,48,96 \
        --methods vanilla,pre,deepnorm,surgery,spectral,gapfree,shaped --output DIR [key=value ...]

Each cell is one `train.py` run in DIR/<method>-L<depth>[-<init>][-s<seed>]/ with the method's
preset and model.n_layers set and collapse monitors on. Each preset runs with its own init unless
--inits names some (then model.init is set); --seeds sets train.seed. A method may carry overrides
of its own after `+`: `vanilla+model.head_bias=none` is the vanilla preset with that one change,
so a confound experiment (one change at a time) is a sweep too.

A cell with a `result.json` is complete and skipped, unless its config.yaml no longer matches what
the cell resolves to (a preset changed since: the sweep stops naming the cell and the keys, and
with --force deletes it and reruns it from scratch) or it failed (a crash, an OOM, a lost node may
be transient: then it is retried). An interrupted cell
resumes from its newest checkpoint (train.resume=auto); a cell that diverges (the non-finite guard
stops it) is recorded as diverged, one whose final loss is not below its first as stalled, and the
sweep goes on.
The report (DIR/results.csv, results.md and PNGs) is rewritten after every cell, from every finished
cell in DIR: sub-grids run one after another into one directory build one table.

    --jobs N      run N cells at once, each with its share of the CPU cores and, on a GPU node, its
                  own GPU (one of CUDA_VISIBLE_DEVICES, or 0..N-1)
    --slurm       write DIR/sweep.sbatch, a SLURM array job with one task per cell (sbatch it, then
                  run this command again with --report to collect)
    --cell N      run only cell N (what each array task does)
    --init-only   no training: collapse metrics at init through monitors.probe, up to any depth
    --remeasure   no training: each finished cell's end-of-run collapse measured again (once) on its last
                  monitored checkpoint (tools.collapse), into its result.json; then the report
"""

import argparse
import collections
import csv
import functools
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from queue import SimpleQueue

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from configs import PROVENANCE, ConfigError, exit_on_error, load_config, saved_config, schema_fields  # noqa: E402
from launch.run_dir import RunDir, read_jsonl  # noqa: E402

PRESETS = ["vanilla", "pre", "deepnorm", "surgery", "spectral", "gapfree", "shaped"]
COLUMNS = ["method", "depth", "init", "seed", "status", "final_loss", "final_val_loss", "final_eval_loss", "unigram_entropy",
           "tokens_per_s",
           "cos_sim_init", "cos_sim_end", "stable_rank_end", "collapsed_layers_end", "first_collapse_step",
           "peak_memory_mb"]


def cells(methods, depths, inits, seeds):
    """(method, depth, init or "", seed or None); shallow depths first, so that an unfinished sweep has
    whole rows of the table."""
    return [(m, d, i, s) for d in depths for s in seeds for i in inits for m in methods]


def row_cell(row):
    """The cell of a results row (from result.json or results.csv, where numbers are strings)."""
    seed = row.get("seed")
    return (row["method"], int(row["depth"]), "" if row["init"] == "preset" else row["init"],
            None if seed in (None, "") else int(seed))


def cell_dir(output, cell):
    method, depth, init, seed = cell
    return Path(output) / (f"{method}-L{depth}" + (f"-{init}" if init else "") + (f"-s{seed}" if seed is not None else ""))


def preset_and_overrides(method):
    """`vanilla+model.head_bias=none` -> (configs/methods/vanilla.yaml, ["model.head_bias=none"])."""
    name, *overrides = method.split("+")
    return ROOT / f"configs/methods/{name}.yaml", overrides


def cell_config(args, cell):
    """(config files, overrides) of one cell, as train.py gets them (without train.out_dir)."""
    method, depth, init, seed = cell
    preset, own = preset_and_overrides(method)
    overrides = [*args.overrides, *own, f"model.n_layers={depth}"]
    overrides += [f"model.init={init}"] * bool(init) + [f"train.seed={seed}"] * (seed is not None)
    return [*args.config, preset], overrides


def train_command(args, cell):
    paths, overrides = cell_config(args, cell)
    configs = [c for path in paths for c in ("--config", str(path))]
    return [sys.executable, str(ROOT / "train.py"), *configs, *overrides, f"train.out_dir={cell_dir(args.output, cell)}"]


def changed_keys(args, cell):
    """The keys whose recorded value in a finished cell's config.yaml differs from what the cell resolves
    to now ([] for a cell not run yet). Keys that only manage or record a run (the run directory, save
    policy, logging: `run_only` in the schema) do not count: a cell copied from another sweep's output
    is the same experiment. A config written before a key existed reads as that run ran
    (configs.saved_config): a cell that predates the LM head's bias differs in model.head_bias."""
    from omegaconf import OmegaConf

    recorded = RunDir(cell_dir(args.output, cell)).config
    if not recorded.is_file():
        return []
    now = load_config(*cell_config(args, cell))
    try:
        saved = saved_config(OmegaConf.load(recorded))
    except ConfigError as e:  # a key since removed or retyped: not the experiment this Fathom would run
        return [f"a config this Fathom cannot read: {e}"]
    now.model.vocab_size = saved.model.vocab_size  # set from the data by train.py
    return [key for key, f in schema_fields() if not f.metadata["run_only"]
            and OmegaConf.select(OmegaConf.structured(saved), key) != OmegaConf.select(OmegaConf.structured(now), key)]


def check_unchanged(args, cell):
    """A finished cell whose experiment changed is deleted and rerun only with --force: it may be the
    only copy of hours of training."""
    changed = changed_keys(args, cell)
    if changed and not args.force:
        raise ConfigError(f"{cell_dir(args.output, cell)} ran with another config than this sweep asks for (differs in "
                          f"{', '.join(changed)}): pass --force to delete and rerun it, or another --output")
    return changed


def recorded_provenance(directory):
    """What the cell's config.yaml records of where it came from (launch/provenance.py), or None."""
    from omegaconf import OmegaConf

    config = RunDir(directory).config
    saved = OmegaConf.to_container(OmegaConf.load(config)) if config.is_file() else {}
    return saved.get(PROVENANCE)


def cell_result(directory, cell, returncode, is_collapsed):
    method, depth, init, seed = cell
    metrics = read_jsonl(RunDir(directory).metrics)
    monitors = read_jsonl(RunDir(directory).monitors)
    train = [r for r in metrics if "loss" in r]
    val = [r for r in metrics if "val_loss" in r]
    final_eval = [r for r in metrics if "final_eval_loss" in r]
    data = [r for r in metrics if "unigram_entropy" in r]
    losses = [r["loss"] for r in train]
    diverged = returncode == 3 or (losses and not math.isfinite(losses[-1]))
    stalled = len(losses) > 1 and losses[-1] >= losses[0]
    crossed = [r["step"] for r in monitors if any(is_collapsed(layer) for layer in r["layers"])]
    status = "diverged" if diverged else f"failed (exit {returncode})" if returncode else "stalled" if stalled else "ok"
    return {
        "method": method, "depth": depth, "init": init or "preset", "seed": seed, "status": status,
        "final_loss": losses[-1] if losses else None,
        "final_val_loss": val[-1]["val_loss"] if val else None,
        "final_eval_loss": final_eval[-1]["final_eval_loss"] if final_eval else None,
        "unigram_entropy": data[0]["unigram_entropy"] if data else None,
        "tokens_per_s": sum(r["tokens_per_s"] for r in train[1:]) / max(1, len(train) - 1) if train else None,
        "cos_sim_init": monitors[0]["layers"][-1]["cos_sim"] if monitors else None,
        **end_of_run(monitors[-1]["layers"] if monitors else None, is_collapsed),
        "first_collapse_step": crossed[0] if crossed else None,
        "peak_memory_mb": max((r["peak_memory_mb"] for r in train), default=None),
        "provenance": recorded_provenance(directory),
    }


def end_of_run(layers, is_collapsed):
    """The deepest layer's cosine and stable rank and the number of collapsed layers at the end."""
    return {"cos_sim_end": layers[-1]["cos_sim"] if layers else None,
            "stable_rank_end": layers[-1]["stable_rank"] if layers else None,
            "collapsed_layers_end": sum(map(is_collapsed, layers)) if layers else None}


def remeasure(output, is_collapsed):
    """For every finished cell in the output directory that kept a checkpoint of its last monitored
    step and has not been measured again: measure its layers there (tools.collapse) and rewrite
    result.json's end-of-run fields from them, with the commit that measured them under
    `end_remeasured`. For cells monitored by code whose metric has since been fixed; the monitor's own
    file is left as it was written."""
    from launch.provenance import provenance
    from monitors.collapse import significant
    from tools.collapse import measure

    code = {k: v for k, v in provenance(None).items() if k in ("commit", "dirty")}
    for result_file in sorted(Path(output).glob("*/result.json")):
        directory = result_file.parent
        result = json.loads(result_file.read_text())
        if "end_remeasured" in result:
            continue
        step = read_jsonl(RunDir(directory).monitors)[-1]["step"]
        tag = f"step_{step:08d}"
        if not (directory / "checkpoints" / tag).is_dir():
            print(f"{directory.name}: no checkpoint {tag}, kept", file=sys.stderr)
            continue
        layers = significant(measure(directory, tag)["layers"])  # as the monitor writes them
        result.update(end_of_run(layers, is_collapsed), end_remeasured={"step": step, **code})
        (directory / "result.json.tmp").write_text(json.dumps(result, indent=1) + "\n")
        (directory / "result.json.tmp").replace(result_file)
        print(f"{directory.name}: {result['collapsed_layers_end']} collapsed at step {step}", file=sys.stderr)


def run_cell(args, cell, is_collapsed, env=None):
    directory = cell_dir(args.output, cell)
    changed = check_unchanged(args, cell)
    if changed:
        print(f"{directory.name}: {', '.join(changed)} changed since it ran; --force: deleted, rerunning from scratch",
              file=sys.stderr)
        shutil.rmtree(directory)
    result_file = directory / "result.json"
    if result_file.is_file():
        # a failure (out of memory, a lost node) may be transient: only a finished run is final
        if not json.loads(result_file.read_text())["status"].startswith("failed"):
            print(f"{directory.name}: complete, skipped", file=sys.stderr)
            return
        print(f"{directory.name}: failed before, retrying", file=sys.stderr)
    print(f"{directory.name}: training", file=sys.stderr)
    proc = subprocess.run(train_command(args, cell), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, env=env)
    if proc.returncode == 2:  # bad input: the same for every cell, so stop the sweep with its message
        raise ConfigError(f"{directory.name}: {proc.stderr.strip().splitlines()[-1].removeprefix('error: ')}")
    if proc.returncode not in (0, 3):
        (directory / "train.stderr").write_text(proc.stderr)
    result = cell_result(directory, cell, proc.returncode, is_collapsed)
    # written whole, then renamed: a report running beside this job never reads half a result
    (directory / "result.json.tmp").write_text(json.dumps(result, indent=1) + "\n")
    (directory / "result.json.tmp").replace(directory / "result.json")


def job_environments(jobs):
    """One environment per concurrent job: an equal share of the cores (so that N jobs do not
    oversubscribe them) and one GPU each. With one job the caller's environment is kept."""
    if jobs == 1:
        return [None]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = visible.split(",") if visible else [str(i) for i in range(jobs)]
    if jobs > len(gpus):
        raise ConfigError(f"--jobs {jobs}: CUDA_VISIBLE_DEVICES={visible} lists only {len(gpus)} GPUs; "
                          f"use --jobs {len(gpus)} or list more GPUs")
    threads = str(max(1, len(os.sched_getaffinity(0)) // jobs))
    return [{**os.environ, "OMP_NUM_THREADS": threads, "CUDA_VISIBLE_DEVICES": gpu} for gpu in gpus[:jobs]]


def run_grid(args, grid, is_collapsed):
    """Every cell, args.jobs at a time; the report is rewritten after each, so that an interrupted
    sweep still has its table."""
    free = SimpleQueue()
    for env in job_environments(args.jobs):
        free.put(env)
    reporting = threading.Lock()

    def job(cell):
        env = free.get()
        try:
            run_cell(args, cell, is_collapsed, env)
        finally:
            free.put(env)
        with reporting:
            report(args.output)

    pool = ThreadPoolExecutor(args.jobs)
    try:
        for done in [pool.submit(job, cell) for cell in grid]:
            done.result()
    finally:  # after bad input, start no further cell
        pool.shutdown(cancel_futures=True)


def probe_cell(args, cell, tokens):
    from monitors.metrics import collapsed
    from monitors.probe import probe

    method, depth, init, seed = cell
    cfg = load_config(*cell_config(args, cell))
    layers = probe(cfg, tokens)
    m = cfg.monitor
    row = dict.fromkeys(COLUMNS)
    row.update(method=method, depth=depth, init=init or "preset", seed=seed, status="init only",
               cos_sim_init=layers[-1]["cos_sim"],
               first_collapse_step=0 if any(collapsed(x, m.collapse_threshold, m.stable_rank_threshold)
                                            for x in layers) else None)
    return row


def fmt(value):
    if value is None:
        return "–"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_report(output, rows):
    output = Path(output)
    with open(output / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")  # result.json keeps the rest
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    (output / "results.md").write_text("\n".join(lines) + "\n")
    plot(output, rows)


def plot(output, rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    inits = sorted({r["init"] for r in rows})
    for metric, name in [("final_val_loss", "val_loss_vs_depth.png"), ("cos_sim_end", "cos_sim_vs_depth.png"),
                         ("stable_rank_end", "stable_rank_vs_depth.png"), ("cos_sim_init", "cos_sim_init_vs_depth.png")]:
        if all(r.get(metric) is None for r in rows):
            continue
        # one legend entry per method, beside the panels, so that a sweep of many methods still fits
        fig, axes = plt.subplots(1, len(inits), figsize=(5 * len(inits) + 4 * (1 + len({r["method"] for r in rows}) // 24), 3.8), squeeze=False, sharey=True,
                                 layout="constrained")
        for ax, init in zip(axes[0], inits):
            for method in dict.fromkeys(r["method"] for r in rows):
                by_depth = collections.defaultdict(list)  # several seeds: their mean, and each seed as a dot
                for r in rows:
                    if r["method"] == method and r["init"] == init and r.get(metric) is not None:
                        by_depth[r["depth"]].append(r[metric])
                if by_depth:
                    depths = sorted(by_depth)
                    line, = ax.plot(depths, [sum(by_depth[d]) / len(by_depth[d]) for d in depths], marker="o", label=method)
                    spread = [(d, v) for d in depths if len(by_depth[d]) > 1 for v in by_depth[d]]
                    if spread:
                        ax.scatter(*zip(*spread), s=8, color=line.get_color())
            ax.set(xscale="log", xlabel="depth (layers)", title=f"init={init}", ylabel=metric)
            # log ticks like 2×10^1 say nothing; the swept depths are the only x values that exist
            depths = sorted({r["depth"] for r in rows if r["init"] == init})
            ax.set_xticks(depths, [str(d) for d in depths], minor=False)
            ax.set_xticks([], minor=True)
        handles, labels = axes[0][-1].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside right upper", fontsize=6, ncols=1 + len(labels) // 24)
        fig.savefig(output / name, dpi=110)
        plt.close(fig)


HEATMAP_METRICS = {"cos_sim": "token cosine", "stable_rank": "stable rank"}


def heatmaps(output, rows):
    """Per-layer cosine and stable rank over training, one panel per cell: <metric>_heatmaps_L<depth>.png
    for each depth. Both, because tokens can collapse onto one line through the origin (stable rank
    1) while their mean cosine stays low."""
    from monitors.plot import metric_grid

    trained = [r for r in rows if r["status"] != "init only"]
    for depth in sorted({r["depth"] for r in trained}):
        at_depth = {row_cell(r): r for r in trained if r["depth"] == depth}
        # one panel row per init and seed: each seed is its own run, and its panels say which
        lines = list(dict.fromkeys((init, seed) for _, _, init, seed in at_depth))
        methods = list(dict.fromkeys(method for method, *_ in at_depth))
        histories = {}  # read once, drawn once per metric
        for (i, (init, seed)), (j, method) in itertools.product(enumerate(lines), enumerate(methods)):
            cell = (method, depth, init, seed)
            history = read_jsonl(RunDir(cell_dir(output, cell)).monitors) if cell in at_depth else []
            if history:
                seed_name = f", seed {seed}" if seed is not None else ""
                # a line per override: side by side, one-line names of one-change presets run into each other
                name = method.replace("+", "\n+")
                histories[i, j] = (f"{name}\n{at_depth[cell]['init']}{seed_name}", history)
        if not histories:
            continue
        for metric, label in HEATMAP_METRICS.items():
            panels = {ij: (title, *metric_grid(history, metric)) for ij, (title, history) in histories.items()}
            figure = heatmap_grid(panels, (len(lines), len(methods)), metric, label)
            figure.suptitle(f"depth {depth}: per-layer {label} over training")
            figure.savefig(Path(output) / f"{metric}_heatmaps_L{depth}.png", dpi=100)


def heatmap_grid(panels, shape, metric, label):
    """A figure of layer × step panels {(row, column): (title, grid, steps)} with one colour bar:
    the metric's own range, else the panels' common one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from monitors.plot import FIXED_RANGES, draw_heatmap

    grids = np.concatenate([grid.ravel() for _, grid, _ in panels.values()])
    value_range = FIXED_RANGES.get(metric) or (np.nanmin(grids), np.nanmax(grids))
    rows, columns = shape
    fig, axes = plt.subplots(rows, columns, figsize=(1 + 2.4 * columns, 0.6 + 2.2 * rows), squeeze=False,
                             sharex=True, sharey=True, layout="constrained")
    plt.close(fig)  # the caller saves it; pyplot need not keep it
    for (i, j), ax in np.ndenumerate(axes):
        if (i, j) not in panels:
            ax.set_axis_off()
            continue
        title, grid, steps = panels[i, j]
        image = draw_heatmap(ax, grid, steps, metric, value_range)
        ax.set_title(title, fontsize=9)
    for ax in axes[-1]:
        ax.set_xlabel("step")
    for ax in axes[:, 0]:
        ax.set_ylabel("layer")
    fig.colorbar(image, ax=axes, label=label)
    return fig


def slurm_script(args, grid):
    argv = " ".join(a for a in sys.argv[1:] if a != "--slurm")
    path = Path(args.output) / "sweep.sbatch"
    path.write_text(f"""#!/usr/bin/env bash
# One SLURM array task per cell of this sweep; afterwards collect with:
#   python tools/sweep.py {argv} --report
#SBATCH --job-name=fathom-sweep
#SBATCH --array=0-{len(grid) - 1}
#SBATCH --nodes=1
#SBATCH --gpus-per-node=1
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --output={Path(args.output).resolve()}/slurm-%A_%a.out
cd {ROOT}
python tools/sweep.py {argv} --cell "$SLURM_ARRAY_TASK_ID"
""")
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", action="append", default=[], help="base YAML (shape, schedule); repeatable")
    ap.add_argument("--depths", required=True, help="comma-separated model.n_layers values")
    ap.add_argument("--methods", default=",".join(PRESETS),
                    help="preset names from configs/methods/")
    ap.add_argument("--inits", default="", help="model.init values (default: each preset's own init)")
    ap.add_argument("--seeds", default="", help="train.seed values (default: the config's seed, not in cell names)")
    ap.add_argument("--output", required=True)
    ap.add_argument("--jobs", type=int, default=1, help="cells run at once (cores or GPUs split between them)")
    ap.add_argument("--slurm", action="store_true")
    ap.add_argument("--cell", type=int)
    ap.add_argument("--report", action="store_true",
                    help="only collect results.* and plots from the finished cells in --output")
    ap.add_argument("--remeasure", action="store_true",
                    help="measure the last monitored checkpoint of each finished cell in --output again "
                         "(tools.collapse) and rewrite its end-of-run collapse fields, then report")
    ap.add_argument("--init-only", action="store_true")
    ap.add_argument("--force", action="store_true",
                    help="delete and rerun finished cells whose config differs from what the sweep asks for")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args(argv)
    depths = [int(d) for d in args.depths.split(",")]
    methods, inits = args.methods.split(","), args.inits.split(",")
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [None]

    def validate():
        if args.jobs < 1:
            raise ConfigError(f"--jobs {args.jobs}: must be at least 1")
        job_environments(args.jobs)
        for method in methods:
            preset, _ = preset_and_overrides(method)
            if not preset.is_file():
                raise ConfigError(f"--methods: no preset configs/methods/{preset.name}")
        for cell in cells(methods, depths, inits, seeds):  # every cell's config, before any training
            load_config(*cell_config(args, cell))
            if not (args.report or args.remeasure or args.init_only or args.slurm):
                check_unchanged(args, cell)
        return load_config(args.config, args.overrides)

    base = exit_on_error(validate)
    grid = cells(methods, depths, inits, seeds)
    Path(args.output).mkdir(parents=True, exist_ok=True)
    if args.slurm:
        print(f"wrote {slurm_script(args, grid)}: sbatch it ({len(grid)} array tasks)")
        return
    if args.init_only:
        from monitors.probe import held_out_tokens

        tokens = held_out_tokens(base, base.monitor.batch, base.train.seq_len)
        rows = []
        for cell in grid:
            rows.append(probe_cell(args, cell, tokens))
            print(f"{cell}: cos_sim {rows[-1]['cos_sim_init']:.3f}", file=sys.stderr)
        write_report(args.output, rows)
        return
    from monitors.metrics import collapsed

    m = base.monitor
    is_collapsed = functools.partial(collapsed, cos_threshold=m.collapse_threshold,
                                     stable_rank_threshold=m.stable_rank_threshold)
    if args.cell is not None:  # one task of the SLURM array; --report collects afterwards
        exit_on_error(run_cell, args, grid[args.cell], is_collapsed)
        return
    if args.remeasure:
        exit_on_error(remeasure, args.output, is_collapsed)
    elif not args.report:
        exit_on_error(run_grid, args, grid, is_collapsed)
    report(args.output)
    print(f"results: {Path(args.output) / 'results.md'}")


def report(output):
    """results.* and plots from every finished cell in the output directory, not only the current
    grid's: a sub-grid (one depth, some methods) run into a shared directory must not shrink its
    table. Rows by depth, seed, init, then preset in PRESETS order (a preset's one-change variants
    after it)."""
    def order(row):
        method, depth, init, seed = row_cell(row)
        preset = method.split("+")[0]
        return (depth, seed is not None, seed or 0, init,
                PRESETS.index(preset) if preset in PRESETS else len(PRESETS), method)

    rows = sorted((json.loads(path.read_text()) for path in Path(output).glob("*/result.json")), key=order)
    if rows:
        write_report(output, rows)
        heatmaps(output, rows)


if __name__ == "__main__":
    main()
