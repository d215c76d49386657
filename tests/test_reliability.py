"""What a cluster run relies on, each scenario reproduced: a fresh start never destroys another
run, resume refuses a changed sample order, torn log lines and hostile files are harmless, ranks
that resolved different data stop at once, the time limit counts from the start, and failed sweep
cells are retried."""

import gzip
import json
import os
import pickle
import shutil
import subprocess
import sys
import sysconfig
import time

import pytest

from data.meta import DataError, read_prepared
from launch.checkpoint import load_safely
from launch.preemption import StopSignal
from launch.run_dir import RunDir, read_jsonl
from launch.step_policy import Decision
from tests.conftest import COMMON, ROOT, launcher, records, run_cli, train


def one_error_line(proc):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    return lines[0]


def snapshot(run):
    """Every file of a run directory and its bytes (tensorboard aside)."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and "tensorboard" not in p.parts}


@pytest.fixture
def used_run(resumed_runs, tmp_path):
    _, cut = resumed_runs["python", 0]  # 6 steps, complete checkpoints at steps 3 and 6
    copy = tmp_path / "used"
    shutil.copytree(cut, copy)
    return copy


def test_a_fresh_start_into_another_runs_directory_is_refused_then_moved_aside(used_run, tiny_data):
    before = snapshot(used_run)
    proc = train("python", used_run, tiny_data, "train.resume=none", "train.save_every=1", "train.stop_at_step=2",
                 check=False)
    line = one_error_line(proc)
    assert "holds another run (checkpoints up to step_00000006, metrics up to step 6) and train.resume=none" in line
    assert "train.overwrite=true" in line and snapshot(used_run) == before  # nothing lost

    proc = train("python", used_run, tiny_data, "train.resume=none", "train.overwrite=true", "train.save_every=1",
                 "train.stop_at_step=2")
    aside = [p for p in used_run.parent.iterdir() if p.name.startswith("used.replaced-")]
    assert len(aside) == 1 and snapshot(aside[0]) == before  # the old run, whole, beside the new one
    assert [r["step"] for r in records(used_run)] == [1, 2]
    assert sorted(p.name for p in RunDir(used_run).checkpoints.iterdir()) == ["step_00000001", "step_00000002"]
    train("python", used_run, tiny_data)  # resume=auto continues the new run, not the old one
    assert [r["step"] for r in records(used_run)] == list(range(1, 7))


@pytest.mark.parametrize("change,message", [
    ("train.seed=7", "was saved with train.seed=1337, this run has 7, which reshuffles the samples"),
    ("train.seq_len=16", "was saved with train.seq_len=32, this run has 16"),
    ("DATA", "was trained on other data (fingerprint"),
])
def test_resume_refuses_a_changed_sample_order(used_run, tiny_data, tmp_path, change, message):
    data = tiny_data
    if change == "DATA":  # re-prepared with the same tokenizer and another split: other windows, other order
        data = tmp_path / "reprepared"
        stdlib = sysconfig.get_paths()["stdlib"]
        run_cli("-m", "data.prepare", "--input", f"{stdlib}/email/**/*.py", "--output", str(data),
                "--tokenizer", str(tiny_data / "tokenizer.json"), "--val-fraction", "0.2")
        assert read_prepared(data)["tokenizer"]["hash"] == read_prepared(tiny_data)["tokenizer"]["hash"]
    extra = [] if change == "DATA" else [change]
    line = one_error_line(train("python", used_run, data, *extra, "train.max_steps=8", check=False))
    assert message in line and "train.allow_data_change=true" in line
    train("python", used_run, data, *extra, "train.max_steps=8", "train.allow_data_change=true")
    assert [r["step"] for r in records(used_run)] == list(range(1, 9))


def test_torn_last_lines_are_dropped_on_resume(used_run, tiny_data):
    torn = '{"step": 7, "loss": 4.2'  # a kill in the middle of a write
    with open(used_run / "metrics.jsonl", "a") as f:
        f.write(torn)
    with open(used_run / "monitors.jsonl.gz", "ab") as f:
        f.write(gzip.compress(torn.encode())[:-6])  # the gzip member loses its end too
    proc = train("python", used_run, tiny_data, "train.max_steps=8", "monitor.every=2")
    assert "the last line was cut short" in proc.stderr
    assert [r["step"] for r in records(used_run)] == list(range(1, 9))
    assert [r["step"] for r in read_jsonl(used_run / "monitors.jsonl.gz")] == [0, 8]
    with pytest.raises(ValueError, match="line 1 is not JSON"):
        (used_run / "bad.jsonl").write_text('{"step": 1\n{"step": 2}\n')
        read_jsonl(used_run / "bad.jsonl")


class Exploit:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_checkpoint_files_cannot_run_code(tmp_path, tiny_data):
    import torch

    evil = tmp_path / "rng_rank_00000.pt"
    torch.save({"torch": Exploit(tmp_path / "pwned")}, evil)
    with pytest.raises(pickle.UnpicklingError):
        load_safely(evil)
    assert not (tmp_path / "pwned").exists()
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    meta = json.loads((data / "meta.json").read_text())
    meta["splits"]["val"]["shards"] = ["../../../etc/passwd"]
    (data / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"names the file '\.\./\.\./\.\./etc/passwd' outside"):
        read_prepared(data)


@pytest.mark.slow
def test_two_ranks_with_different_data_stop_before_the_first_step(tiny_data, other_data, tmp_path):
    # the same data.path on each "node", different content: rank 1 runs in a directory of its own
    for rank, data in enumerate((tiny_data, other_data)):
        (tmp_path / f"node{rank}").mkdir()
        os.symlink(data, tmp_path / f"node{rank}" / "data")
    program, launch = launcher("torchrun")
    script = f'cd {tmp_path}/node$LOCAL_RANK && exec {sys.executable} {ROOT}/train.py "$@"'
    out = tmp_path / "run"
    proc = run_cli(*launch, "--no-python", "bash", "-c", script, "train", *COMMON, "data.path=data",
                   f"train.out_dir={out}", program=program, env={"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"},
                   check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: rank 1 on ") and "resolved another tokenizer than rank 0" \
        in errors[0], proc.stderr[-3000:]
    assert not (out / "metrics.jsonl").exists()


def test_time_limit_counts_from_the_start_of_the_process():
    stop = StopSignal(time_limit_minutes=1, started=time.monotonic() - 55)
    assert stop.out_of_time(step_seconds=1.0, save_seconds=2.0)  # 55 s of start-up already spent
    assert not StopSignal(time_limit_minutes=1).out_of_time(step_seconds=1.0, save_seconds=2.0)


def test_the_step_policy_saves_rolls_back_and_stops_for_each_reason(request):
    import signal

    import torch

    from configs import load_config
    from launch.preemption import StopSignal
    from launch.step_policy import StepPolicy

    t = load_config([], ["train.max_steps=100", "train.save_every=10", "train.spike_factor=2", "train.spike_window=3",
                         "train.max_bad_steps=2", "train.time_limit_minutes=1"]).train
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    policy = StepPolicy(t, StopSignal(t.time_limit_minutes))  # takes SIGTERM and SIGUSR1, as train.py does
    for sig, handler in handlers.items():
        request.addfinalizer(lambda sig=sig, handler=handler: signal.signal(sig, handler))

    def step(done, loss=1.0, skipped=False, seconds=0.1):
        return policy.after_step(done, torch.tensor(loss), 1, skipped, seconds)

    assert [step(i) for i in (1, 2, 3)][-1] == Decision(roll_back=False, save=False, stop=None)
    assert step(10).save and not step(11).save  # train.save_every
    assert step(12, loss=2.5).roll_back and not step(13, loss=1.5).roll_back  # > 2 × the mean of the last 3
    policy.skipped_step()
    assert step(14, skipped=True).stop is None
    policy.skipped_step()
    diverged = step(15, skipped=True)
    assert (diverged.stop, diverged.save, diverged.requeue) == ("diverged", True, False)
    assert step(16).stop is None  # a good step ends the run of bad ones
    assert step(17, seconds=31).stop == "the time limit"  # two more such steps would not fit in the minute
    os.kill(os.getpid(), signal.SIGUSR1)
    stopped = step(18)
    assert (stopped.stop, stopped.save, stopped.requeue) == ("a signal", True, True)
    assert step(100).save  # the last step


@pytest.mark.parametrize("left,limit,margin,minutes", [
    ("UNLIMITED", "UNLIMITED", "10", "0"), ("NOT_SET", "NOT_SET", "10", "0"), ("18:59", "19:00", "10", None),
    ("1-02:03:04", "2-00:00:00", "10", "1553.07"), ("45:10", "1:00:00", "10", "35.17"),
    ("19:59", "20:00", "10", "9.98"), ("58", "1:00", "0.5", "0.47")])  # seconds into a job at its limit
def test_slurm_time_left(tmp_path, left, limit, margin, minutes):
    fake = tmp_path / "squeue"  # called as: squeue -h -j ID -o %L (time left) or -o %l (time limit)
    fake.write_text(f"#!/bin/sh\ncase \"$5\" in %l) echo '{limit}' ;; *) echo '{left}' ;; esac\n")
    fake.chmod(0o755)
    out = subprocess.run(["bash", "-c", f". {ROOT}/launch/slurm_common.sh && time_left_minutes"], capture_output=True,
                         text=True, env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "SLURM_JOB_ID": "1",
                                         "SLURM_SUBMIT_DIR": str(tmp_path),
                                         "FATHOM_MARGIN_MINUTES": margin})
    if minutes is None:  # a limit shorter than twice the margin: it would requeue itself forever
        assert out.returncode == 2 and out.stderr.startswith(
            "error: this job has a time limit of 19.0 minutes, less than twice FATHOM_MARGIN_MINUTES=10"), out.stderr
    else:
        assert (out.returncode, out.stdout.strip()) == (0, minutes), out.stderr


@pytest.mark.parametrize("env,ranks", [({"SLURM_GPUS_ON_NODE": "4"}, "4"), ({"FATHOM_RANKS_PER_NODE": "2"}, "2"),
                                       ({"SLURM_GPUS_ON_NODE": "0", "FATHOM_RANKS_PER_NODE": "2"}, "2"),
                                       ({"SLURM_GPUS_ON_NODE": "0"}, None), ({}, None)])
def test_slurm_ranks_per_node_come_from_the_allocation_or_are_given(tmp_path, env, ranks):
    """One rank per allocated GPU; an allocation without GPUs says how many CPU ranks, or stops."""
    base = {k: v for k, v in os.environ.items() if k not in ("SLURM_GPUS_ON_NODE", "FATHOM_RANKS_PER_NODE")}
    out = subprocess.run(["bash", "-c", f"set -e; . {ROOT}/launch/slurm_common.sh; n=$(ranks_per_node); echo $n"],
                         capture_output=True, text=True, env={**base, **env, "SLURM_JOB_ID": "1",
                                                              "SLURM_SUBMIT_DIR": str(tmp_path)})
    if ranks:
        assert (out.returncode, out.stdout.strip()) == (0, ranks), out.stderr
    else:
        assert out.returncode == 2 and out.stderr.startswith("error: this allocation has no GPUs: set FATHOM_RANKS_PER_NODE")


@pytest.mark.slow
def test_failed_sweep_cells_are_retried(tiny_data, tmp_path):
    out = tmp_path / "sweep"
    cell = out / "vanilla-L1"
    cell.mkdir(parents=True)
    (cell / "result.json").write_text(json.dumps({"status": "failed (exit 1)"}))  # e.g. an OOM last time
    proc = run_cli("tools/sweep.py", "--methods", "vanilla", "--depths", "1", "--output", str(out), *COMMON,
                   f"data.path={tiny_data}")
    assert "vanilla-L1: failed before, retrying" in proc.stderr
    assert json.loads((cell / "result.json").read_text())["status"] == "ok"
    again = run_cli("tools/sweep.py", "--methods", "vanilla", "--depths", "1", "--output", str(out), *COMMON,
                    f"data.path={tiny_data}")
    assert "vanilla-L1: complete, skipped" in again.stderr
