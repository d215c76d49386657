import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from launch.distributed import free_port

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


DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")


def launcher(name):
    """(program, arguments before train.py) of each way to start a run."""
    return {
        "deepspeed": (DEEPSPEED, ["--num_gpus", "2", "--master_port", str(free_port())]),
        "torchrun": (sys.executable, ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]),
        "python": (sys.executable, []),
    }[name]


# fixtures that start training runs: a test using one is `slow` (as is one marked so itself); CI runs
# every test, `pytest -m "not slow"` the rest in a few minutes
TRAINING_FIXTURES = {"tiny_run", "resumed_runs", "distributed_runs", "logged_run", "exports", "unmonitored_run",
                     "used_run", "finished_run", "bad_things", "small_source"}


def pytest_collection_modifyitems(items):
    for item in items:
        if TRAINING_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)


def made_once(tmp_path_factory, name, make):
    """A session fixture's runs, made once for all the pytest-xdist workers of a session (the suite
    runs on two, pyproject.toml): the first worker to ask makes them under a lock, the others wait
    and read where they are. make(folder) returns something JSON can hold."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return make(tmp_path_factory.mktemp(name))
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp().parent  # the session's, shared by its workers
    made = root / f"{name}.json"
    with FileLock(str(root / f"{name}.lock")):
        if not made.is_file():
            (root / name).mkdir()
            made.write_text(json.dumps(make(root / name)))
    return json.loads(made.read_text())


# the short runs of the distributed, resume and use tests
STEPS, STOP = 6, 3
# eval_batches=1000: the validation at the end covers the whole val split (tests/test_use.py evaluates it)
COMMON = [*TINY_MODEL, "train.micro_batch_size=4", f"train.max_steps={STEPS}", "train.log_every=1", "train.eval_every=100",
          "train.eval_batches=1000"]


def records(out_dir):
    lines = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "loss" in r]


def losses(out_dir):
    return [r["loss"] for r in records(out_dir)]


def train(how, out_dir, data, *extra, check=True):
    program, launch = launcher(how)
    # one thread per rank under every launcher (torchrun sets it, deepspeed leaves torch's default):
    # with the thread count, and so the order of CPU reductions, fixed, runs compare bit for bit
    return run_cli(*launch, "train.py", *COMMON, *extra, f"data.path={data}", f"train.out_dir={out_dir}",
                   program=program, env={"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}, check=check)


# ZeRO-2 on one rank takes the same save and load path as on two
RESUMED = [("python", 0), ("torchrun", 0), ("torchrun", 2)]


@pytest.fixture(scope="session")
def resumed_runs(tiny_data, tmp_path_factory):
    """(launcher, ZeRO stage) -> (out_dir of the straight run, out_dir of the stopped-and-resumed run).
    Also keeps a copy of the 2-rank ZeRO-2 run as it was when stopped, for the 2 -> 1 resume."""
    def make(root):
        out = {}
        for how, zero in RESUMED:
            straight, cut = root / f"{how}-zero{zero}-straight", root / f"{how}-zero{zero}-cut"
            train(how, straight, tiny_data, f"train.zero_stage={zero}")
            train(how, cut, tiny_data, f"train.zero_stage={zero}", f"train.stop_at_step={STOP}")
            if (how, zero) == ("torchrun", 2):
                shutil.copytree(cut, root / "stopped-2-ranks")
            train(how, cut, tiny_data, f"train.zero_stage={zero}")
            out[f"{how}-{zero}"] = str(straight), str(cut)
        out["stopped-2-ranks"] = str(root / "stopped-2-ranks")
        return out

    made = made_once(tmp_path_factory, "resume", make)
    out = {"stopped-2-ranks": Path(made.pop("stopped-2-ranks"))}
    for key, (straight, cut) in made.items():
        how, zero = key.rsplit("-", 1)
        out[how, int(zero)] = Path(straight), Path(cut)
    return out


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A small prepared corpus: the stdlib's json and email packages, vocabulary 512."""
    def make(root):
        stdlib = sysconfig.get_paths()["stdlib"]
        run_cli("-m", "data.prepare", "--input", f"{stdlib}/email/**/*.py", "--output", str(root / "tiny"),
                "--vocab-size", "512", "--val-fraction", "0.1")
        return str(root / "tiny")

    return Path(made_once(tmp_path_factory, "data", make))


def train_tiny(data, out, *extra):
    """A 40-step run of the tiny model through train.py."""
    run_cli("train.py", *TINY_MODEL, f"data.path={data}", f"train.out_dir={out}", "train.max_steps=40",
            "train.log_every=5", "train.eval_every=20", *extra)
    return out


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory):
    """One short training run through train.py, shared by the tests that read its outputs."""
    return train_tiny(tiny_data, tmp_path_factory.mktemp("runs") / "tiny", "monitor.every=10")


@pytest.fixture(scope="session")
def other_data(tmp_path_factory):
    """Prepared data whose tokenizer is not tiny_data's."""
    root = tmp_path_factory.mktemp("other")
    (root / "text").mkdir()
    for i in range(4):
        (root / "text" / f"{i}.txt").write_text(f"another corpus, document {i}: " + "lorem ipsum dolor sit amet " * 200)
    run_cli("-m", "data.prepare", "--input", str(root / "text"), "--output", str(root / "data"), "--vocab-size", "300",
            "--val-fraction", "0.5")
    return root / "data"
