"""A short real training run through train.py: the run directory and a falling loss."""

import gzip
import json
import platform
import subprocess

import yaml

from configs import load_config
from tests.conftest import ROOT


def read_jsonl(path):
    """Every line of a JSON-lines file, plain or gzipped; strict, unlike the trainer's reader: a test's
    run writes no torn line."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rt") as f:
        return [json.loads(line) for line in f]


def test_loss_falls_and_run_dir_is_complete(tiny_run):
    lines = read_jsonl(tiny_run / "metrics.jsonl")
    train = [r for r in lines if "loss" in r]
    val = [r for r in lines if "val_loss" in r]
    assert [r["step"] for r in train] == list(range(5, 45, 5))
    # the log-unigram head bias starts the model at the unigram level; it then learns past it
    unigram = lines[0]["unigram_entropy"]
    assert abs(train[0]["loss"] - unigram) < 0.3
    assert [r["step"] for r in val] == [20, 40] and val[1]["val_loss"] < val[0]["val_loss"]
    assert val[1]["val_loss"] < unigram
    assert all(r["grad_norm"] > 0 and r["tokens_per_s"] > 0 and r["lr"] > 0 for r in train)
    assert lines[0]["unigram_entropy"] > 0
    assert list((tiny_run / "tensorboard").glob("events.out.tfevents.*"))


def test_resolved_config_is_written_and_loads_back(tiny_run, tiny_data):
    saved = yaml.safe_load((tiny_run / "config.yaml").read_text())
    assert saved["data"]["path"] == str(tiny_data) and saved["model"]["n_layers"] == 2
    assert saved["model"]["vocab_size"] == json.loads((tiny_data / "meta.json").read_text())["tokenizer"]["vocab_size"]
    assert load_config([tiny_run / "config.yaml"]).train.max_steps == 40
    # where the run came from: a record beside the settings, which reading the file back ignores
    import deepspeed
    import torch

    from data.meta import data_fingerprint

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert saved["provenance"] == {"commit": head or None, "dirty": saved["provenance"]["dirty"],
                                   "python": platform.python_version(), "torch": torch.__version__,
                                   "deepspeed": deepspeed.__version__,
                                   "data": data_fingerprint(json.loads((tiny_data / "meta.json").read_text()))}
