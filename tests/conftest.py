import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY_MODEL = ["model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.max_seq_len=64", "train.seq_len=32",
              "train.micro_batch_size=8", "train.warmup_steps=5", "train.lr=3e-3", "train.eval_batches=2"]


def run_cli(*args, check=True, timeout=600, env=None, program=sys.executable):
    """Run a project command as a user would, from the checkout root."""
    proc = subprocess.run([program, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A small prepared corpus: the stdlib's json and email packages, vocabulary 512."""
    out = tmp_path_factory.mktemp("data") / "tiny"
    stdlib = sysconfig.get_paths()["stdlib"]
    run_cli("-m", "data.prepare", "--input", f"{stdlib}/email/**/*.py", "--output", str(out), "--vocab-size", "512",
            "--val-fraction", "0.1")
    return out


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory):
    """One short training run through train.py, shared by the tests that read its outputs."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    run_cli("train.py", *TINY_MODEL, f"data.path={tiny_data}", f"train.out_dir={out}", "train.max_steps=40",
            "train.log_every=5", "train.eval_every=20", "monitor.every=10")
    return out
