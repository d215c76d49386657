"""The layout of a run directory (train.out_dir): the one module that knows its file names.

    OUT_DIR/config.yaml      the resolved config of the latest start, and its provenance (launch/provenance.py)
    OUT_DIR/metrics.jsonl    training, validation, data, guard and rollback lines, one per logged step
    OUT_DIR/monitors.jsonl.gz  per-layer collapse metrics (monitors/collapse.py); runs from before
                             0.1.0 have a plain monitors.jsonl, which is read and extended as it is
    OUT_DIR/eval.jsonl       results of `python -m tools.evaluate`
    OUT_DIR/tensorboard/     event files (and torch.profiler traces of train.profile_steps)
    OUT_DIR/wandb/, wandb_id the W&B run of train.wandb_project, resumed by id on every start
    OUT_DIR/checkpoints/     step_NNNNNNNN folders, complete once they hold Fathom's marker (launch/checkpoint.py)

JSON-lines files are appended a whole line at a time (a .gz one a gzip member per line, which
gzip readers and zcat join). A kill or a full disk can still cut the last line short: reading
drops such a line with a warning instead of failing every later resume, and a file is only ever
rewritten through a temporary file and a rename. This module imports no torch.
"""

import gzip
import json
import os
import re
import sys
import time
from pathlib import Path

# a checkpoint folder (checkpoints/step_00001200) and the marker that makes it complete (launch/checkpoint.py)
MARKER = "fathom_complete.json"
TAG = re.compile(r"step_(\d{8})")


def tag_name(step):
    return f"step_{step:08d}"


def complete_checkpoints(directory):
    """Complete checkpoint folders, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if TAG.fullmatch(p.name) and (p / MARKER).is_file())


class RunDir:
    def __init__(self, path):
        self.path = Path(path)
        self.config = self.path / "config.yaml"
        self.metrics = self.path / "metrics.jsonl"
        self.eval = self.path / "eval.jsonl"
        self.tensorboard = self.path / "tensorboard"
        self.checkpoints = self.path / "checkpoints"
        self.wandb_id = self.path / "wandb_id"

    @property
    def monitors(self):
        plain = self.path / "monitors.jsonl"
        return plain if plain.is_file() else self.path / "monitors.jsonl.gz"

    def describe_run(self):
        """What an earlier run left here ("checkpoints up to step 20, metrics up to step 20"), or None."""
        found = []
        done = complete_checkpoints(self.checkpoints)
        if done:
            found.append(f"checkpoints up to {done[-1].name}")
        steps = [r["step"] for r in read_jsonl(self.metrics) if "step" in r]
        if steps:
            found.append(f"metrics up to step {max(steps)}")
        return ", ".join(found) or None

    def move_aside(self):
        """Rename the directory to OUT_DIR.replaced-<time> (nothing is deleted); returns the new path."""
        aside = self.path.with_name(f"{self.path.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(self.path, aside)
        return aside


def _open(path, mode):
    return gzip.open(path, mode + "t") if Path(path).suffix == ".gz" else open(path, mode)


def read_jsonl(path, last_step=None):
    """The records of a JSON-lines file, plain or gzipped (those with step <= last_step, if given). A
    last line cut short is dropped with a warning; a bad line elsewhere means the file was edited:
    named, and fatal."""
    path = Path(path)
    if not path.is_file():
        return []
    lines, cut = [], False
    with _open(path, "r") as f:
        try:
            for line in f:
                lines.append(line)
        except EOFError:  # the last gzip member lost its end: what it held so far is in `lines`
            cut = True
    lines = [line for line in lines if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError:
            if i < len(lines) - 1:
                raise ValueError(f"{path}: line {i + 1} is not JSON (edited by hand?): fix or delete that line") from None
            cut = True
    if cut:
        print(f"warning: {path}: the last line was cut short (a kill or a full disk during a write); "
              "dropped", file=sys.stderr)
    return [r for r in records if last_step is None or r.get("step", 0) <= last_step]


def append_jsonl(path, record):
    with _open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def write_atomically(path, content):
    """Replace path's content (str or bytes) all at once: a crash leaves the old file or the new one, never half."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb" if isinstance(content, bytes) else "w") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def rewrite_jsonl(path, records):
    text = "".join(json.dumps(r) + "\n" for r in records)
    write_atomically(path, gzip.compress(text.encode(), mtime=0) if Path(path).suffix == ".gz" else text)


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
