"""Checkpoints and exact resume: bitwise on CPU, across kill -9 and SIGTERM, from 2 ranks to 1,
and one clear error for every mismatch."""

import json
import os
import random
import shutil
import signal
import subprocess
import time

import pytest

from launch.checkpoint import MARKER
from launch.preemption import REQUEUE
from launch.run_dir import read_jsonl
from tests.conftest import COMMON, RESUMED, ROOT, STEPS, launcher, losses, records, train


@pytest.mark.parametrize("how,zero", RESUMED)
def test_stop_and_resume_is_bitwise_identical(resumed_runs, how, zero):
    straight, cut = resumed_runs[how, zero]
    assert len(losses(straight)) == STEPS
    assert losses(cut) == losses(straight)  # exact float equality, steps 1..STEPS, none repeated
    assert [r["step"] for r in records(cut)] == list(range(1, STEPS + 1))
    assert sorted(p.name for p in (cut / "checkpoints").glob("step_*[0-9]")) == ["step_00000003", "step_00000006"]


def test_two_ranks_resume_on_one(resumed_runs, tiny_data):
    """Saved by 2 ranks with ZeRO-2, continued by 1 rank through DeepSpeed's universal checkpoint;
    train.global_batch keeps the global batch, so the sample sequence continues unchanged."""
    stopped = resumed_runs["stopped-2-ranks"]
    straight, _ = resumed_runs["torchrun", 2]
    proc = train("python", stopped, tiny_data, "train.zero_stage=2", "train.global_batch=8")
    assert "grad accum 2" in proc.stderr
    resumed = records(stopped)
    assert [r["samples"] for r in resumed] == [r["samples"] for r in records(straight)]
    assert [r["loss"] for r in resumed] == pytest.approx(losses(straight), rel=1e-5)
    assert (stopped / "checkpoints" / "step_00000003_universal").is_dir()


def wait_for_step(proc, metrics, step, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(r.get("step", 0) >= step and "loss" in r for r in read_jsonl(metrics)):
            return
        assert proc.poll() is None, "the run ended before the kill point"
        time.sleep(0.02)
    raise AssertionError(f"step {step} was not reached")


def start(out_dir, data, *extra, how="python"):
    """A 40-step run in the background, in a process group of its own (so kill -9 takes every rank)."""
    program, launch = launcher(how)
    args = [*COMMON, "train.max_steps=40", "train.save_every=5", *extra, f"data.path={data}", f"train.out_dir={out_dir}"]
    return subprocess.Popen([program, *launch, "train.py", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_kill_9_at_three_random_points_of_a_two_rank_zero2_run(tiny_data, tmp_path):
    """Every rank dies at once (a node lost) at 3 random moments, mid-step or mid-save; each restart
    continues from the newest complete checkpoint and the losses equal an uninterrupted run's."""
    run = ["train.max_steps=24", "train.save_every=3", "train.zero_stage=2"]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert start(reference, tiny_data, *run, how="torchrun").wait() == 0
    rng = random.Random(20261124)
    for i in range(3):
        proc = start(killed, tiny_data, *run, how="torchrun")
        wait_for_step(proc, killed / "metrics.jsonl", 3 + 7 * i + rng.randint(0, 2))
        time.sleep(rng.uniform(0, 0.3))  # anywhere in the step, its save included
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # a kill during a save: the newest folder is partial (no marker, a truncated file)
    # (the last kill may itself have cut a save short: copy the newest complete one)
    newest = sorted(p for p in (killed / "checkpoints").glob("step_*") if (p / MARKER).exists())[-1]
    partial = killed / "checkpoints" / "step_00000023"  # save_every=3 never writes it: a save cut short
    shutil.copytree(newest, partial)
    (partial / MARKER).unlink()
    states = partial / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:100])
    proc = start(killed, tiny_data, *run, how="torchrun")
    assert proc.wait() == 0, proc.stderr.read()[-3000:]
    assert [r["step"] for r in records(killed)] == list(range(1, 25))  # no step logged twice
    assert losses(killed) == losses(reference)


@pytest.mark.slow
def test_sigterm_saves_and_exits_then_resumes(tiny_data, tmp_path):
    out = tmp_path / "run"
    proc = start(out, tiny_data, "train.save_every=0")
    wait_for_step(proc, out / "metrics.jsonl", 3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait() == REQUEUE
    saved = sorted((out / "checkpoints").glob("step_*"))
    assert len(saved) == 1 and (saved[0] / MARKER).is_file()
    step = json.loads((saved[0] / MARKER).read_text())["step"]
    assert step >= 3 and records(out)[-1]["step"] == step
    proc = start(out, tiny_data, "train.save_every=0", f"train.max_steps={step + 2}")
    assert proc.wait() == 0
    assert [r["step"] for r in records(out)][-3:] == [step, step + 1, step + 2]


@pytest.fixture
def finished_run(resumed_runs, tmp_path):
    _, cut = resumed_runs["python", 0]  # complete checkpoints at steps 3 and 6
    copy = tmp_path / "finished"
    shutil.copytree(cut, copy)
    return copy


def expect_error(out_dir, data, *extra):
    proc = train("python", out_dir, data, *extra, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    return lines[0]


def test_mismatched_model_is_refused(finished_run, tiny_data):
    line = expect_error(finished_run, tiny_data, "model.n_layers=3")
    assert "saved with model.n_layers=2, this run has 3" in line


def test_data_with_another_tokenizer_is_refused(finished_run, other_data):
    line = expect_error(finished_run, other_data)
    assert "was trained on data with another tokenizer" in line


def test_missing_file_names_it_and_the_last_good_checkpoint(finished_run, tiny_data):
    ckpts = finished_run / "checkpoints"
    (ckpts / "step_00000006" / "mp_rank_00_model_states.pt").unlink()
    line = expect_error(finished_run, tiny_data)
    assert "step_00000006 is missing mp_rank_00_model_states.pt" in line
    assert f"the last good checkpoint is {ckpts / 'step_00000003'}" in line
