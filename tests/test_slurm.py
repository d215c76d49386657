"""The SLURM scripts in launch/ and the sweep's array job on a real scheduler: a one-node SLURM on
this machine (tests/slurm/start.sh), tiny 2-rank CPU runs, and the things a cluster does to a job:
a time limit, USR1 and TERM, a cancel in the middle of a save, a run that diverges, an array task
killed mid-run. Every run is compared step for step with one plain `torchrun` run of the same
config. In CI a SLURM that cannot start fails these tests with its reason; elsewhere they skip.
"""

import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.run_dir import MARKER
from tests.conftest import COMMON, ROOT, launcher, losses, records, run_cli

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# A small model whose steps take ~0.1 s on a 2-core machine, so that LONG outlasts a job of the
# time-limit test at any load; a constant lr after the warm-up, so that a shorter run's losses are a
# prefix of a longer one's.
RUN = [*COMMON, "model.n_layers=4", "model.d_model=128", "model.n_heads=4", "train.seq_len=64",
       "train.micro_batch_size=16", "train.min_lr_ratio=1", "train.eval_batches=2"]
SHORT, LONG = 30, 300
SCRIPTS = {  # the resources a user gives a CPU allocation on the command line, per script
    "srun": ["--ntasks-per-node=2", "--cpus-per-task=1"],
    "torchrun": ["--ntasks-per-node=1", "--cpus-per-task=2"],
    "deepspeed": ["--ntasks-per-node=1", "--cpus-per-task=2"],
}
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL"}


@pytest.fixture(scope="module")
def slurm():
    running = subprocess.run(["pgrep", "-x", "slurmctld"], capture_output=True).returncode == 0
    proc = subprocess.run(["bash", str(ROOT / "tests/slurm/start.sh")], capture_output=True, text=True)
    if proc.returncode:
        reason = f"no SLURM: {(proc.stderr.strip().splitlines() or ['tests/slurm/start.sh failed'])[-1]}"
        (pytest.fail if os.environ.get("CI") else pytest.skip)(reason)
    yield
    if not running:
        subprocess.run(["bash", str(ROOT / "tests/slurm/stop.sh")], check=True)


def job_env():
    """What every job step needs (sbatch passes the submitter's environment on): this venv's
    python, torchrun and deepspeed first on PATH, CPU ranks, one thread each, and a save margin
    that fits the tests' 10-minute jobs."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "DS_ACCELERATOR": "cpu",
            "OMP_NUM_THREADS": "1", "FATHOM_RANKS_PER_NODE": "2", "FATHOM_MARGIN_MINUTES": "1"}


def sbatch(script, tmp_path, *train_args, options=(), env=None):
    """Submit a launch/ script from the checkout (its SLURM_SUBMIT_DIR) with a CPU node's
    resources; returns the job id."""
    out = subprocess.run(["sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0", "--time=10",
                          f"--output={tmp_path}/slurm-%j.out", *SCRIPTS[script], *options,
                          f"launch/slurm_{script}.sbatch", *train_args],
                         cwd=ROOT, capture_output=True, text=True, env={**job_env(), **(env or {})}, check=True)
    return out.stdout.strip().split(";")[0]


def job(job_id):
    """scontrol's fields of a job (ended jobs stay listed for MinJobAge, 10 minutes)."""
    line = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", line))


def wait(job_id, timeout=300):
    """Wait for a job to end, releasing it each time it is requeued: SLURM holds a requeued job
    for two minutes (BeginTime) before it may start again, which a test need not sit through. The
    release waits a few seconds, as SLURM's own hold does, for the requeued instance to finish
    ending: a new one started at once can be marked ended by the old one's exit."""
    deadline, held_since = time.time() + timeout, None
    while time.time() < deadline:
        info = job(job_id)
        if info.get("JobState") in ENDED:
            return info
        if info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime":
            held_since = held_since or time.time()
            if time.time() - held_since > 3:
                subprocess.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now"], capture_output=True)
        else:
            held_since = None
        time.sleep(0.5)
    subprocess.run(["scancel", job_id])
    raise AssertionError(f"job {job_id} did not end in {timeout} s: {job(job_id)}")


def wait_for(predicate, job_id, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        assert job(job_id).get("JobState") not in ENDED, f"job {job_id} ended first: {job(job_id)}"
        time.sleep(0.02)
    raise AssertionError(f"job {job_id}: condition not met in {timeout} s")


def holding_signals(job_id):
    """Both ranks of the job are in start-up, with SIGTERM and SIGUSR1 blocked (launch/preemption.py)."""
    held = (1 << (15 - 1)) | (1 << (10 - 1))  # SIGTERM, SIGUSR1 in /proc's SigBlk mask
    rows = subprocess.run(["scontrol", "listpids", job_id], capture_output=True, text=True).stdout.splitlines()[1:]
    masks = []
    for pid, _, step, *_ in (row.split() for row in rows):
        try:
            if step == "0" and Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[1] == b"train.py":  # a rank
                masks.append(int(re.search(r"SigBlk:\s*(\w+)", Path(f"/proc/{pid}/status").read_text()).group(1), 16))
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
    return len(masks) == 2 and all(m & held == held for m in masks)


def logged_step(out, step):
    return lambda: (out / "metrics.jsonl").is_file() and any(r["step"] >= step for r in records(out))


def slurm_log(tmp_path, job_id):
    return (tmp_path / f"slurm-{job_id}.out").read_text()


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    """The losses of the LONG run under plain torchrun: what every SLURM run must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "run"
    program, launch = launcher("torchrun")
    run_cli(*launch, "train.py", *RUN, f"train.max_steps={LONG}", f"data.path={tiny_data}", f"train.out_dir={out}",
            program=program, env={"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    return losses(out)


def run_args(data, out, steps=SHORT, *extra):
    return [*RUN, f"train.max_steps={steps}", f"data.path={data}", f"train.out_dir={out}", *extra]


def assert_same_run(out, reference, steps):
    assert [r["step"] for r in records(out)] == list(range(1, steps + 1))  # each step logged once
    assert losses(out) == reference[:steps]


# the torchrun script's run to completion is the time-limit test's, which goes through it
@pytest.mark.parametrize("script", ["srun", "deepspeed"])
def test_each_script_trains_to_completion_as_torchrun_does(slurm, tiny_data, reference, tmp_path, script):
    job_id = sbatch(script, tmp_path, *run_args(tiny_data, tmp_path / "run"))
    info = wait(job_id)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), slurm_log(tmp_path, job_id)
    assert_same_run(tmp_path / "run", reference, SHORT)
    assert not list(ROOT.glob(f"*{job_id}*")), "the job left files in the checkout"


def test_a_time_limit_saves_requeues_and_the_run_finishes(slurm, tiny_data, reference, tmp_path):
    """--time=1 with a half-minute margin: each job saves and stops after ~30 s (start-up included),
    requeues itself, and the next job resumes from its checkpoint. Through the torchrun script, which
    asks for no warning signal: SLURM may send one up to a minute early, in a one-minute job at once."""
    out = tmp_path / "run"
    job_id = sbatch("torchrun", tmp_path, *run_args(tiny_data, out, LONG), options=["--time=1"],
                    env={"FATHOM_MARGIN_MINUTES": "0.5"})
    info = wait(job_id, timeout=600)
    log = slurm_log(tmp_path, job_id)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log
    assert int(info["Restarts"]) >= 1 and log.count("requeueing job") == int(info["Restarts"]), log
    assert "stopped for the time limit" in log
    assert_same_run(out, reference, LONG)


@pytest.mark.parametrize("signal,when", [("USR1", "mid-run"), ("TERM", "mid-run"), ("USR1", "start-up")])
def test_a_signal_saves_requeues_and_the_run_finishes(slurm, tiny_data, reference, tmp_path, signal, when):
    """Mid-run, or as soon as the ranks start: in the imports, the process-group set-up and the build
    check of DeepSpeed's ops, whose ninja child gets the signal too."""
    out = tmp_path / "run"
    job_id = sbatch("srun", tmp_path, *run_args(tiny_data, out))
    wait_for(logged_step(out, 5) if when == "mid-run" else lambda: holding_signals(job_id), job_id)
    subprocess.run(["scancel", f"--signal={signal}", job_id], check=True)
    info = wait(job_id)
    log = slurm_log(tmp_path, job_id)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log
    assert ("saved step 1 and stopped for a signal" in log) == (when == "start-up"), log
    assert "stopped for a signal" in log
    assert_same_run(out, reference, SHORT)


def test_a_cancel_during_a_save_keeps_the_last_checkpoint(slurm, tiny_data, reference, tmp_path):
    """A plain scancel (TERM, then KILL after the cluster's KillWait) while a checkpoint is being
    written: the newest complete one stays loadable and the next submission resumes from it."""
    out = tmp_path / "run"
    saving = lambda: any(not (p / MARKER).exists() for p in (out / "checkpoints").glob("step_*"))  # noqa: E731
    job_id = sbatch("srun", tmp_path, *run_args(tiny_data, out, SHORT, "train.save_every=1"))
    wait_for(logged_step(out, 3), job_id)
    wait_for(saving, job_id)
    subprocess.run(["scancel", job_id], check=True)
    assert wait(job_id)["JobState"] == "CANCELLED"
    assert any((p / MARKER).exists() for p in (out / "checkpoints").glob("step_*"))
    job_id = sbatch("srun", tmp_path, *run_args(tiny_data, out, SHORT, "train.save_every=1"))
    info = wait(job_id)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), slurm_log(tmp_path, job_id)
    assert "resumed from" in slurm_log(tmp_path, job_id)
    assert_same_run(out, reference, SHORT)
    assert not list(ROOT.glob(".fathom-requeue-*")), "the cancelled job left its requeue file in the checkout"


def test_a_diverged_run_exits_3_and_is_not_requeued(slurm, tiny_data, tmp_path):
    out = tmp_path / "run"
    job_id = sbatch("srun", tmp_path, *run_args(tiny_data, out, SHORT, "train.inject_nonfinite=0:3:100",
                                                "train.max_bad_steps=2"))
    info = wait(job_id)
    log = slurm_log(tmp_path, job_id)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "3:0", "0"), log
    assert "requeueing" not in log


def test_the_sweep_array_job_runs_retries_a_killed_cell_and_reports(slurm, tiny_data, tmp_path):
    """2 presets x 2 depths as a SLURM array; one task cancelled mid-run; sbatch again: the finished
    cells are skipped, the cancelled one resumes from its checkpoint, and --report tables all four."""
    out = tmp_path / "sweep"
    sweep = ["tools/sweep.py", "--depths", "1,2", "--methods", "vanilla,pre", "--output", str(out),
             *[a for a in COMMON if not a.startswith("model.n_layers")], "train.max_steps=40", "train.save_every=5",
             f"data.path={tiny_data}"]
    run_cli(*sweep, "--slurm")
    array = ["sbatch", "--parsable", "--gpus-per-node=0", "--ntasks=1", "--cpus-per-task=1", str(out / "sweep.sbatch")]
    env = {**job_env(), "OMP_NUM_THREADS": "1"}
    job_id = subprocess.run(array, cwd=ROOT, capture_output=True, text=True, env=env, check=True).stdout.strip()
    victim = out / "pre-L2"  # task 3: depths outer, methods inner
    wait_for(logged_step(victim, 10), f"{job_id}_3", timeout=300)
    subprocess.run(["scancel", f"{job_id}_3"], check=True)
    for task in range(4):
        wait(f"{job_id}_{task}", timeout=300)
    assert not (victim / "result.json").is_file() or "failed" in json.loads((victim / "result.json").read_text())["status"]
    first_steps = (victim / "metrics.jsonl").read_text().splitlines()[:3]  # throughputs differ in a fresh run
    stopped_at = records(victim)[-1]["step"]
    job_id = subprocess.run(array, cwd=ROOT, capture_output=True, text=True, env=env, check=True).stdout.strip()
    for task in range(4):
        wait(f"{job_id}_{task}", timeout=300)
    assert "complete, skipped" in (out / f"slurm-{job_id}_0.out").read_text()
    assert (victim / "metrics.jsonl").read_text().splitlines()[:3] == first_steps  # resumed, not started again
    assert [r["step"] for r in records(victim)] == list(range(1, 41)) and stopped_at < 40
    run_cli(*sweep, "--report")
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["method"], r["depth"], r["status"]) for r in rows) == [
        ("pre", "1", "ok"), ("pre", "2", "ok"), ("vanilla", "1", "ok"), ("vanilla", "2", "ok")]
