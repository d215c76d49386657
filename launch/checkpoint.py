"""Atomic DeepSpeed checkpoints with Fathom's own completion marker, and exact resume.

Layout: OUT_DIR/checkpoints/step_00001200/ holds DeepSpeed's files (any ZeRO stage), one RNG file
per rank, and, written last, `fathom_complete.json`: the step, the samples consumed, the world
size it was saved with, the resolved config, the tokenizer hash and the size of every file. A
checkpoint without that marker does not exist for Fathom: a crash or kill -9 during a save leaves
the previous one as the newest complete checkpoint, and the partial folder is deleted at the next
start. The marker is written by rename after every rank has saved and fsynced (DeepSpeed's own
`latest` file is written by rank 0 alone, before the other ranks finish, so it is not used).

`find_resume_point` reads only JSON and file sizes, so a bad checkpoint stops the run before any
process group or GPU is set up.
"""

import json
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from configs import ConfigError, saved_config
from launch.run_dir import MARKER, TAG, RunDir, complete_checkpoints, fsync_dir, tag_name, write_atomically


@dataclass
class ResumePoint:
    path: Path
    marker: dict

    @property
    def step(self):
        return self.marker["step"]

    def needs_universal(self, world_size):
        """Partitioned optimizer state (ZeRO >= 1, or bf16's sharded fp32 master weights) saved with
        another number of ranks is loaded through DeepSpeed's universal checkpoint."""
        saved = self.marker["world_size"]
        partitioned = self.marker["zero_stage"] > 0 or self.marker["precision"] == "bf16"
        return partitioned and saved != world_size


def verify(path, previous):
    """Every file the marker lists is there with its size; else name it and the last good checkpoint."""
    fallback = (f"the last good checkpoint is {previous}: resume from it with train.resume={previous}"
                if previous else "no earlier checkpoint is complete: start afresh with train.resume=none")
    try:
        marker = json.loads((path / MARKER).read_text())
    except ValueError:
        marker = None
    if not isinstance(marker, dict) or not {"files", "step", "samples_seen", "config"} <= marker.keys():
        raise ConfigError(f"checkpoint {path}: {MARKER} is unreadable; {fallback}")
    for name, size in marker["files"].items():
        f = path / name
        if not f.is_file():
            raise ConfigError(f"checkpoint {path} is missing {name}; {fallback}")
        if f.stat().st_size != size:
            raise ConfigError(f"checkpoint {path}: {name} has {f.stat().st_size} bytes, {size} were saved; {fallback}")
    return marker


# what a resume must keep for the sample order to continue exactly (data/loader.py)
DATA_ORDER_KEYS = ("seed", "seq_len")


def find_resume_point(cfg, tokenizer_hash, fingerprint):
    """The checkpoint this run continues from (train.resume), checked against the config and data."""
    resume = cfg.train.resume
    if resume == "none":
        return None
    if resume == "auto":
        candidates = complete_checkpoints(RunDir(cfg.train.out_dir).checkpoints)
        if not candidates:
            return None
    else:
        path = Path(resume)
        if not path.exists():
            raise ConfigError(f"train.resume={resume!r} does not exist: pass a checkpoints/step_NNNNNNNN folder, or auto or none")
        if (path / MARKER).is_file():
            candidates = [path]
        else:
            candidates = complete_checkpoints(path)
            if not candidates:
                raise ConfigError(f"train.resume={resume!r} is no complete Fathom checkpoint (no {MARKER}): "
                                  "pass a checkpoints/step_NNNNNNNN folder, or auto or none")
    path = candidates[-1]
    previous = candidates[-2] if len(candidates) > 1 else None
    marker = verify(path, previous)
    if marker["tokenizer_hash"] != tokenizer_hash:
        raise ConfigError(f"checkpoint {path} was trained on data with another tokenizer (hash "
                          f"{marker['tokenizer_hash'][:12]}, data.path has {tokenizer_hash[:12]}): point data.path at "
                          "the data the run started with")
    if not cfg.train.allow_data_change:
        order_fix = ("point data.path at the data the run started with, or set train.allow_data_change=true to "
                     "continue on a different sample order")
        if marker.get("data_fingerprint", fingerprint) != fingerprint:
            raise ConfigError(f"checkpoint {path} was trained on other data (fingerprint "
                              f"{marker['data_fingerprint'][:12]}, data.path has {fingerprint[:12]}; re-prepared?): {order_fix}")
        for key in DATA_ORDER_KEYS:
            saved = marker["config"]["train"][key]
            if saved != getattr(cfg.train, key):
                raise ConfigError(f"checkpoint {path} was saved with train.{key}={saved!r}, this run has "
                                  f"{getattr(cfg.train, key)!r}, which reshuffles the samples: resume with the same "
                                  f"value, or set train.allow_data_change=true")
    saved_model, model = _plain(saved_config(marker["config"]).model), _plain(cfg.model)
    changed = sorted(k for k in set(saved_model) | set(model) if saved_model.get(k) != model.get(k))
    if changed:
        key = changed[0]
        raise ConfigError(f"checkpoint {path} was saved with model.{key}={saved_model.get(key)!r}, this run has "
                          f"{model.get(key)!r}: resume with the same model, or set train.resume=none or a new train.out_dir")
    return ResumePoint(path, marker)


def _plain(section):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(section))


def rng_state():
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def load_safely(path):
    """torch.load that cannot run code from the file (a checkpoint may come from anywhere): tensors
    and plain containers, plus the numpy array types the RNG states hold."""
    import numpy as np
    import torch

    numpy_types = [np.ndarray, np.dtype, np.dtypes.UInt32DType, np._core.multiarray._reconstruct]
    with torch.serialization.safe_globals(numpy_types):
        return torch.load(path, map_location="cpu", weights_only=True)


def set_rng_state(state):
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def fsync_tree(path):
    for f in sorted(Path(path).rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(path)


class Checkpointer:
    """Saves and loads one run's checkpoints; every rank calls save() and load() together."""

    def __init__(self, engine, cfg, rank, world_size, precision, tokenizer_hash, fingerprint):
        self.engine, self.cfg, self.rank, self.world_size = engine, cfg, rank, world_size
        self.precision, self.tokenizer_hash, self.fingerprint = precision, tokenizer_hash, fingerprint
        self.directory = RunDir(cfg.train.out_dir).checkpoints

    def remove_incomplete(self):
        """Partial folders left by a crash during a save (rank 0, before training starts)."""
        if self.rank != 0 or not self.directory.is_dir():
            return
        for p in self.directory.iterdir():
            if p.is_dir() and TAG.fullmatch(p.name) and not (p / MARKER).is_file():
                shutil.rmtree(p, ignore_errors=True)

    def save(self, step, samples_seen):
        import torch
        import torch.distributed as dist

        tag = tag_name(step)
        path = self.directory / tag
        if self.rank == 0 and (path / MARKER).is_file():
            # the same step saved again (after a rollback): incomplete from now until the new marker
            (path / MARKER).unlink()
            fsync_dir(path)
        dist.barrier()
        client = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.4}}
        self.engine.save_checkpoint(str(self.directory), tag=tag, client_state=client, save_latest=False)
        torch.save(rng_state(), path / f"rng_rank_{self.rank:05d}.pt")
        fsync_tree(path)
        dist.barrier()
        if self.rank == 0:
            files = {str(f.relative_to(path)): f.stat().st_size for f in sorted(path.rglob("*")) if f.is_file()}
            marker = {"step": step, "samples_seen": samples_seen, "world_size": self.world_size,
                      "zero_stage": self.cfg.train.zero_stage, "precision": self.precision,
                      "tokenizer_hash": self.tokenizer_hash, "data_fingerprint": self.fingerprint, "files": files,
                      "config": _plain(self.cfg)}
            write_atomically(path / MARKER, json.dumps(marker, indent=1))
            self.prune()
        dist.barrier()

    def newest(self):
        """The newest complete checkpoint of this run, or None."""
        done = complete_checkpoints(self.directory)
        return ResumePoint(done[-1], verify(done[-1], None)) if done else None

    def prune(self):
        """Keep the newest train.keep_last complete checkpoints (and their universal conversions)."""
        for old in complete_checkpoints(self.directory)[: -self.cfg.train.keep_last]:
            (old / MARKER).unlink()  # first the marker, so a crash mid-delete leaves an incomplete folder
            shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(old.with_name(old.name + "_universal"), ignore_errors=True)

    def load(self, point):
        """Restore the engine (weights, optimizer, LR schedule) and this rank's RNG from `point`."""
        import torch.distributed as dist

        tag = point.path.name
        if point.needs_universal(self.world_size):
            universal = point.path.with_name(tag + "_universal")
            if self.rank == 0 and not universal.is_dir():
                convert_to_universal(point.path, universal)
            dist.barrier()
            tag = universal.name
        load_path, _ = self.engine.load_checkpoint(str(point.path.parent), tag=tag)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {point.path}")
        rng = point.path / f"rng_rank_{self.rank:05d}.pt"
        if rng.is_file() and point.marker["world_size"] == self.world_size:
            set_rng_state(load_safely(rng))


def convert_to_universal(path, universal):
    """DeepSpeed's own converter: partitioned ZeRO/bf16 state -> one file per parameter."""
    tmp = universal.with_name(universal.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(path),
                    "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1"],
                   check=True, stdout=subprocess.DEVNULL)
    os.replace(tmp, universal)
