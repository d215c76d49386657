"""The sweep's bookkeeping on a 2 × 2 grid of tiny models: complete cells are skipped, an
interrupted one resumes, a diverging one is recorded as diverged."""

import csv
import json
import os
from unittest import mock

import pytest

import tools.sweep
from tests.conftest import COMMON, records, run_cli
from tools.sweep import job_environments

GRID = ["--methods", "vanilla,gapfree", "--depths", "1,2", "--inits", "gpt2"]


def sweep(out, data, *extra, check=True):
    return run_cli("tools/sweep.py", *GRID, "--output", str(out), *COMMON, f"data.path={data}", "monitor.every=3",
                   *extra, check=check)


def rows(out):
    with open(out / "results.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_skip_complete_resume_partial_and_report(tiny_data, tmp_path):
    out = tmp_path / "sweep"
    partial = out / "gapfree-L2-gpt2"  # as if the sweep had been killed in the middle of this cell
    run_cli("train.py", "--config", "configs/methods/gapfree.yaml", *COMMON, f"data.path={tiny_data}", "model.n_layers=2",
            "model.init=gpt2", "monitor.every=3", f"train.out_dir={partial}", "train.stop_at_step=3")
    first = sweep(out, tiny_data, "--jobs", "2")
    assert first.stderr.count(": training") == 4
    assert [r["step"] for r in records(partial)] == list(range(1, 7))  # resumed, no step twice
    table = rows(out)
    assert sorted((r["method"], r["depth"]) for r in table) == [("gapfree", "1"), ("gapfree", "2"), ("vanilla", "1"),
                                                               ("vanilla", "2")]
    assert all(r["status"] == "ok" and float(r["final_val_loss"]) > 0 and r["cos_sim_init"] for r in table)
    assert {p.name for p in out.glob("*.png")} >= {"val_loss_vs_depth.png", "cos_sim_vs_depth.png"}
    assert {p.name for p in out.glob("*_heatmaps_L*.png")} == {f"{metric}_heatmaps_L{depth}.png" for depth in (1, 2)
                                                             for metric in ("cos_sim", "stable_rank")}
    results = [json.loads(p.read_text()) for p in out.glob("*/result.json")]
    assert all(set(r["provenance"]) == {"commit", "dirty", "python", "torch", "deepspeed", "data"} for r in results)
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*/result.json")}
    # a cell recorded before a key existed is the same experiment when the key is at its default
    older = out / "vanilla-L1-gpt2" / "config.yaml"
    older.write_text(older.read_text().replace("  compile: false\n", ""))
    again = sweep(out, tiny_data)
    assert again.stderr.count("complete, skipped") == 4 and ": training" not in again.stderr
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/result.json")} == mtimes
    # --remeasure: the end-of-run fields from the last monitored checkpoint, measured again
    cell = out / "gapfree-L2-gpt2" / "result.json"
    before = json.loads(cell.read_text())
    cell.write_text(json.dumps({**before, "stable_rank_end": 0.5, "collapsed_layers_end": 2}))
    sweep(out, tiny_data, "--remeasure")
    after = json.loads(cell.read_text())
    assert after["end_remeasured"]["step"] == 6 and after["end_remeasured"]["commit"] == before["provenance"]["commit"]
    assert after["stable_rank_end"] == pytest.approx(before["stable_rank_end"], rel=2e-4)
    assert {k: v for k, v in after.items() if k not in ("stable_rank_end", "cos_sim_end", "end_remeasured")} == {
        k: v for k, v in before.items() if k not in ("stable_rank_end", "cos_sim_end")}
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*/result.json")}
    sweep(out, tiny_data, "--remeasure")  # a cell measured again is not measured a second time
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/result.json")} == mtimes


@pytest.mark.slow
def test_a_diverging_cell_is_recorded_not_a_crash(tiny_data, tmp_path):
    out = tmp_path / "sweep"
    run_cli("tools/sweep.py", "--methods", "vanilla", "--depths", "2", "--output", str(out), *COMMON,
            f"data.path={tiny_data}", "train.inject_nonfinite=0:2:10", "train.max_bad_steps=2")
    assert [r["status"] for r in rows(out)] == ["diverged"]


@pytest.mark.slow
def test_init_only_sweep(tiny_data, tmp_path):
    out = tmp_path / "init"
    run_cli("tools/sweep.py", *GRID, "--inits", "gpt2,fanin", "--init-only", "--output", str(out), *COMMON,
            f"data.path={tiny_data}")
    table = rows(out)
    assert len(table) == 8 and all(r["status"] == "init only" and r["cos_sim_init"] for r in table)


def test_bad_sweep_input_is_one_line(tiny_data, tmp_path):
    proc = run_cli("tools/sweep.py", "--methods", "vanila", "--depths", "2", "--output", str(tmp_path / "s"),
                   f"data.path={tiny_data}", check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --methods: no preset configs/methods/vanila.yaml"


def test_jobs_split_cores_and_gpus(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    envs = job_environments(2)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["4", "6"]
    assert all(e["OMP_NUM_THREADS"] == str(max(1, len(os.sched_getaffinity(0)) // 2)) for e in envs)
    assert job_environments(1) == [None]  # one job runs in the caller's environment, untouched


def test_more_jobs_than_gpus_is_one_line(tiny_data, tmp_path):
    proc = run_cli("tools/sweep.py", "--depths", "2", "--jobs", "3", "--output", str(tmp_path / "s"),
                   f"data.path={tiny_data}", check=False, env={"CUDA_VISIBLE_DEVICES": "0,1"})
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: --jobs 3: CUDA_VISIBLE_DEVICES=0,1 lists only 2 GPUs; use --jobs 2 or list more GPUs")


@pytest.mark.slow
def test_seeds_one_change_methods_and_stale_cells(tiny_data, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    args = ["tools/sweep.py", "--methods", "vanilla+model.head_bias=none", "--depths", "1", "--seeds", "1,2", "--jobs", "2",
            "--output", str(out), *COMMON, f"data.path={tiny_data}", "monitor.every=3"]
    run_cli(*args)
    table = rows(out)
    assert sorted((r["method"], r["seed"]) for r in table) == [("vanilla+model.head_bias=none", "1"),
                                                               ("vanilla+model.head_bias=none", "2")]
    assert all(r["init"] == "preset" and r["unigram_entropy"] and r["stable_rank_end"] for r in table)
    saved = (out / "vanilla+model.head_bias=none-L1-s2" / "config.yaml").read_text()
    assert "head_bias: none" in saved and "seed: 2" in saved
    # a sub-grid's report still tables every finished cell in the directory
    run_cli("tools/sweep.py", "--methods", "vanilla+model.head_bias=none", "--depths", "1", "--seeds", "2", "--report",
            "--output", str(out), *COMMON, f"data.path={tiny_data}")
    assert [r["seed"] for r in rows(out)] == ["1", "2"]
    # each seed is its own row of heatmap panels, named in the title
    drawn = {}

    def capture(panels, shape, metric, label):
        drawn[metric] = shape, sorted(title for title, *_ in panels.values())
        return mock.MagicMock()

    monkeypatch.setattr(tools.sweep, "heatmap_grid", capture)
    tools.sweep.heatmaps(out, [json.loads(p.read_text()) for p in out.glob("*/result.json")])
    assert drawn["stable_rank"] == ((2, 1), ["vanilla\n+model.head_bias=none\npreset, seed 1",
                                             "vanilla\n+model.head_bias=none\npreset, seed 2"])
    # every cell is scored on the same spread sample of the val split (tests/test_data.py pins the windows)
    assert all(float(r["final_eval_loss"]) > 0 for r in table)
    # the same cells with another setting are other experiments: never deleted without --force ...
    refused = run_cli(*args, "train.lr=1e-3", check=False)
    assert refused.returncode == 2 and "training" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1] == (
        f"error: {out / 'vanilla+model.head_bias=none-L1-s1'} ran with another config than this sweep asks for "
        "(differs in train.lr): pass --force to delete and rerun it, or another --output")
    assert (out / "vanilla+model.head_bias=none-L1-s1" / "result.json").is_file()
    # ... nor for a key that only manages the run
    assert run_cli(*args, "train.save_every=2").stderr.count("complete, skipped") == 2
    # ... and with it, rerun from scratch
    again = run_cli(*args, "train.lr=1e-3", "--force", "--seeds", "1")
    assert again.stderr.count("train.lr changed since it ran; --force: deleted, rerunning from scratch") == 1


def test_depth_tables_read_each_cells_own_logs(tmp_path):
    from bench.depth_table import tables
    from tools.sweep import COLUMNS

    def cell(name, depth, seed, val, grad_first):
        run = tmp_path / f"{name}-L{depth}-s{seed}"
        run.mkdir()
        layers = [{"grad_norm": grad_first}] + [{"grad_norm": 1.0}] * (depth - 1)
        (run / "monitors.jsonl").write_text(json.dumps({"step": 300, "layers": layers}) + "\n")
        (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "val_loss": v}) + "\n"
                                                   for s, v in ((100, val + 0.2), (300, val))))
        return dict(method=name, depth=depth, init="preset", seed=seed, final_val_loss=val, unigram_entropy=3.25,
                    cos_sim_end=0.2, stable_rank_end=3.0, collapsed_layers_end=0)

    with open(tmp_path / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows([cell("vanilla", 4, 1, 2.0, 1.24), cell("vanilla", 4, 2, 2.1, 6.3e-11),
                          cell("pre", 8, 1, 2.5, 48.0)])
    text = tables(tmp_path)
    # two seeds: mean ± half-range, the gap to the unigram entropy; a depth not run reads –
    assert "| `vanilla` | 2.050 ± 0.050, 1.20 below | – |" in text
    # the gradient ratio keeps two figures, so that 1.2 is not printed as 1
    assert "| `vanilla` | 1.2 / 2.20 → 2.00; 6.3e-11 / 2.30 → 2.10 | – |" in text
    assert "| `pre` | – | 48 / 2.70 → 2.50 |" in text


def transfer_cell(directory, rows, depth, lr, alpha, loss, status="ok", seed=1, grad_first=1.0, stack_norms=False):
    """A finished vanilla cell of bench/lr_transfer.py's input: its config.yaml, logs and results.csv row
    (a diverged cell has no final_eval_loss, "")."""
    from configs import load_config, to_yaml

    val = 3.0 if loss == "" else loss + 0.1
    rule = f"model.depth_scaling.stack_norm_rule={stack_norms}"
    method = f"vanilla+train.lr={lr}" + (f"+model.depth_scaling.alpha={alpha}" if alpha else "") + (f"+{rule}" if stack_norms else "")
    run = directory / f"{method}-L{depth}-s{seed}"
    run.mkdir()
    cfg = load_config(["configs/methods/vanilla.yaml"], [f"model.n_layers={depth}", f"train.lr={lr}",
                                                        f"model.depth_scaling.alpha={alpha}", rule])
    (run / "config.yaml").write_text(to_yaml(cfg))
    layers = [{"grad_norm": grad_first}] + [{"grad_norm": 1.0}] * (depth - 1)
    (run / "monitors.jsonl").write_text(json.dumps({"step": 300, "layers": layers}) + "\n")
    (run / "metrics.jsonl").write_text(json.dumps({"step": 300, "val_loss": val}) + "\n")
    rows.append(dict(method=method, depth=depth, init="preset", seed=seed, status=status, final_val_loss=val,
                     final_eval_loss=loss, unigram_entropy=3.25, cos_sim_end=0.2, stable_rank_end=3.0,
                     collapsed_layers_end=0))


def write_results(directory, rows):
    from tools.sweep import COLUMNS

    with open(directory / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def test_lr_transfer_tables_read_each_cells_own_config(tmp_path):
    """bench/lr_transfer.py: curves by (preset, alpha, stack-norm rule) from each cell's config.yaml, the unscaled cells
    at L_base standing in the scaled curve, the best lr per depth in bold, and the transfer rule (the
    shallow best lr, or one grid step away within 0.02 nats; open while the best lr's grid neighbours
    have not all run)."""
    from bench.lr_transfer import curves, tables

    rows = []

    def cell(depth, lr, alpha, loss, status="ok"):
        transfer_cell(tmp_path, rows, depth, lr, alpha, loss, status)

    for lr, loss in ((1e-3, 2.30), (3e-3, 2.20), (1e-2, 2.40)):
        cell(12, lr, 0, loss)
    for lr, loss in ((1e-3, 2.36), (3e-3, 2.35), (1e-2, 2.50)):  # best one step off, within 0.02: transfers
        cell(48, lr, 1, loss)
    for lr, loss, status in ((1e-3, 2.40, "ok"), (3e-3, 3.20, "stalled"), (1e-2, 9.0, "diverged")):
        cell(48, lr, 0, loss, status)
    for lr, loss in ((1e-3, 2.40), (3e-3, 2.30)):  # the shallow best is best, but 1e-2 might beat it
        cell(96, lr, 1, loss)
    for lr, loss in ((1e-3, 2.45), (1e-2, 2.44)):  # the shallow best, 3e-3, not run yet
        cell(192, lr, 1, loss)
    transfer_cell(tmp_path, rows, 192, 3e-3, 1, 2.21, stack_norms=True)  # a curve of its own
    write_results(tmp_path, rows)
    data = curves([tmp_path])
    assert data["vanilla", 1.0, False][12] == data["vanilla", 0.0, False][12] == data["vanilla", 1.0, True][12]
    assert data["vanilla", 1.0, True][192] == {3e-3: [2.21]}  # at L_base the scaled run is the unscaled one
    text = tables(data)
    assert "| 48 | 2.360 | **2.350** | 2.500 | 0.003 | yes |" in text
    assert "| 48 | **2.400** | 3.200 | x | 0.001 | no |" in text
    assert "| 96 | 2.400 | **2.300** | – | 0.003 | open |" in text
    assert "| 192 | 2.450 | – | **2.440** | 0.01 | open |" in text
    assert "| 12 | 2.300 | **2.200** | 2.400 | 0.003 | – |" in text
    assert "**`vanilla`, depth scaling alpha = 1, stack-norm rule**" in text


def test_the_depth_table_keeps_the_shallow_best_lr(tmp_path):
    """bench/lr_transfer.py --at-shallow-lr: each depth-scaled preset at the lr best at its shallowest
    depth, at every depth that lr ran (never a better lr found deeper), seeds as mean ± half-range,
    a diverged cell as its status, the gradient ratio per seed."""
    from bench.lr_transfer import main

    rows = []
    for lr, loss in ((1e-3, 2.30), (3e-3, 2.20)):
        transfer_cell(tmp_path, rows, 12, lr, 0, loss)
    transfer_cell(tmp_path, rows, 48, 1e-3, 1, 2.10)  # better, but not the lr chosen at 12 layers
    transfer_cell(tmp_path, rows, 48, 3e-3, 1, 2.25, seed=1, grad_first=0.5)
    transfer_cell(tmp_path, rows, 48, 3e-3, 1, 2.27, seed=2, grad_first=0.25)
    transfer_cell(tmp_path, rows, 192, 3e-3, 1, "", status="diverged")
    write_results(tmp_path, rows)
    output = tmp_path / "depth.md"
    main([str(tmp_path), "--at-shallow-lr", "--output", str(output)])
    lines = output.read_text().splitlines()
    assert lines[2:] == [
        "| `vanilla`, alpha = 1 | 0.003 | 12 | 2.200 (1 seed) | 1.05 | 0.20 / 3.0 / 0 | 1 |",
        "| `vanilla`, alpha = 1 | 0.003 | 48 | 2.260 ± 0.010 | 0.99 | 0.20 / 3.0 / 0; 0.20 / 3.0 / 0 | 0.5; 0.25 |",
        "| `vanilla`, alpha = 1 | 0.003 | 192 | x | – | diverged | 1 |"]
    assert output.with_suffix(".png").is_file()
