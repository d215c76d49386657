"""Bad input never costs a run: every case stops with one line and exit code 2, before torch is
imported, leaving no files; and the non-finite guard skips bad steps and names the layer."""

import json
import os
import shutil
import time

import numpy as np
import pytest
import torch

from launch.distributed import free_port
from tests.conftest import TINY_MODEL, launcher, run_cli
from tests.test_train import read_jsonl

# (arguments, text the one error line must contain). DATA = a good prepared data directory,
# BADDATA / RUN / CORRUPT are built by the fixture below.
BAD_INPUTS = [
    (["model.n_layer=4"], "did you mean model.n_layers?"),
    (["trian.lr=1"], "did you mean train.lr?"),
    (["model.n_layers=abc"], "model.n_layers='abc' (command line) is not allowed: it must be of type int"),
    (["train.lr=fast"], "train.lr='fast' (command line) is not allowed: it must be of type float"),
    (["train.max_steps=-3"], "train.max_steps=-3 is not allowed: it must be a number > 0"),
    (["train.micro_batch_size=0"], "train.micro_batch_size=0 is not allowed"),
    (["model.d_model=100", "model.n_heads=3"], "model.d_model=100 is not divisible by model.n_heads=3"),
    (["model.norm=sandwich"], "choose one of post, pre, deepnorm"),
    (["model.attention=linear"], "choose one of softmax, gapfree, shaped"),
    (["model.weights=lowrank"], "choose one of standard, spectral"),
    (["model.init=kaiming"], "choose one of gpt2, normal, fanin, xavier"),
    (["model.surgery.site=everywhere"], "choose one of none, attn_out, residual, block"),
    (["model.surgery.tau=1.5"], "model.surgery.tau=1.5 is not allowed: it must be a number in [0, 1]"),
    (["model.surgery.site=residual", "model.surgery.tau=1.0"], "makes position 1 a constant after the LayerNorm"),
    (["model.spectral.mode=negative"], "choose one of sharpen, smooth, free"),
    (["model.spectral.lambda_min=2"], "model.spectral.lambda_min=2.0 exceeds model.spectral.lambda_max=1.0"),
    (["model.shaped.tau0=0"], "model.shaped.tau0=0.0 is not allowed: it must be a number > 0"),
    (["model.max_seq_len=0"], "model.max_seq_len=0 is not allowed"),
    (["train.seq_len=512"], "train.seq_len=512 exceeds model.max_seq_len"),
    (["train.zero_stage=4"], "choose one of 0, 1, 2, 3"),
    (["train.offload_optimizer=true", "train.zero_stage=0"], "train.offload_optimizer=true needs train.zero_stage >= 1"),
    (["train.precision=fp8"], "choose one of auto, fp32, bf16, fp16"),
    (["train.global_batch=20"], "train.global_batch=20 is not divisible by train.micro_batch_size=8 x 1 ranks"),
    (["train.deepspeed_config=missing.json"], "train.deepspeed_config='missing.json' not found"),
    (["train.keep_last=0"], "train.keep_last=0 is not allowed"),
    (["train.inject_nonfinite=abc"], "must be empty or LAYER:STEP[:COUNT]"),
    (["train.inject_nonfinite=9:1"], "names layer 9, the model has layers 0..1"),
    (["train.inject_spike=2:5"], "train.inject_spike='2:5' names layer 2, the model has layers 0..1"),
    (["train.spike_window=0"], "train.spike_window=0 is not allowed"),
    (["monitor.collapse_threshold=2"], "monitor.collapse_threshold=2.0 is not allowed: it must be a number in [0, 1]"),
    (["monitor.every=-1"], "monitor.every=-1 is not allowed"),
    (["data.vocab_size=100"], "data.vocab_size=100 is not allowed: it must be an integer >= 260"),
    (["data.path=/nonexistent/data"], "/nonexistent/data holds no meta.json"),
    (["data.path=BADDATA"], "outside the tokenizer's vocabulary"),
    (["train.resume=/nonexistent/ckpt"], "train.resume='/nonexistent/ckpt' does not exist"),
    (["train.resume=CORRUPT"], "fathom_complete.json is unreadable"),
    (["--config", "missing.yaml"], "config file 'missing.yaml' not found"),
    (["--config", "BADYAML"], "is not valid YAML"),
    (["n_layers"], "bad override 'n_layers': write key=value"),
]


@pytest.fixture(scope="module")
def bad_things(tiny_data, tiny_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    baddata = root / "baddata"
    shutil.copytree(tiny_data, baddata)  # shards of "another tokenizer": ids past the vocabulary
    shard = baddata / "train_0000.bin"
    ids = np.fromfile(shard, dtype=np.uint16)
    ids[5] = 60000
    ids.tofile(shard)
    corrupt = root / "corrupt"
    shutil.copytree(sorted((tiny_run / "checkpoints").glob("step_*"))[-1], corrupt)
    (corrupt / "fathom_complete.json").write_text("{not json")
    badyaml = root / "bad.yaml"
    badyaml.write_text("model: [unclosed\n")
    return {"BADDATA": str(baddata), "CORRUPT": str(corrupt), "BADYAML": str(badyaml), "DATA": str(tiny_data)}


def test_at_least_30_distinct_bad_inputs():
    assert len({tuple(a) for a, _ in BAD_INPUTS}) == len(BAD_INPUTS) >= 30


@pytest.mark.parametrize("args,message", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_stops_with_one_line_before_heavy_work(bad_things, tmp_path, args, message):
    args = [a.replace(k, v) for a in args for k, v in [next(((k, v) for k, v in bad_things.items() if k in a), ("", ""))]]
    data = [] if any(a.startswith("data.path=") for a in args) else [f"data.path={bad_things['DATA']}"]
    out = tmp_path / "run"
    proc = run_cli("-X", "importtime", "train.py", *TINY_MODEL, *data, f"train.out_dir={out}", *args, check=False)
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert "| torch" not in proc.stderr, "torch was imported before the error"
    assert not out.exists()


# every ZeRO stage and precision on 2 ranks, where they could disagree (one rank runs the same checks)
GUARD_MATRIX = [(zero, precision) for zero in (0, 1, 2, 3) for precision in ("fp32", "bf16")]


@pytest.mark.slow
@pytest.mark.parametrize("zero,precision", GUARD_MATRIX, ids=[f"2rank-zero{z}-{p}" for z, p in GUARD_MATRIX])
def test_non_finite_steps_are_skipped_named_and_stop_with_the_last_good_weights(tiny_data, tmp_path, zero, precision):
    """The guard under every ZeRO stage and precision (the fault table in docs/checkpointing.md): DeepSpeed's wrappers
    skip the step themselves, GuardedAdamW under ZeRO-0 fp32 and ZeRO-1/2 bf16 (launch/nonfinite.py); Fathom logs
    each skip, names the layer, and after train.max_bad_steps in a row stops with exit 3 and a checkpoint."""
    from tools.pretrained import consolidated_state_dict

    out = tmp_path / "run"
    program, launch = launcher("torchrun")
    proc = run_cli(*launch, "train.py", *TINY_MODEL, "train.micro_batch_size=4", f"data.path={tiny_data}",
                   f"train.out_dir={out}", "train.max_steps=10", "train.log_every=1", "monitor.every=0",
                   f"train.zero_stage={zero}", f"train.precision={precision}", "train.save_every=2", "train.keep_last=5",
                   "train.inject_nonfinite=1:3:5", "train.max_bad_steps=3", program=program,
                   env={"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}, check=False)
    # torchrun reports a failed worker as exit 1 and prints the worker's own code
    assert proc.returncode == 1 and "exitcode  : 3" in proc.stderr, proc.stderr[-3000:]
    lines = read_jsonl(out / "metrics.jsonl")
    assert [(r["step"], r["nonfinite"]) for r in lines if r.get("skipped")] == [
        (s, "the activations of layer 1") for s in (3, 4, 5)]
    assert "stopped: 3 non-finite steps in a row (train.max_bad_steps), first in the activations of layer 1" in proc.stderr
    good, last = (out / "checkpoints" / f"step_{s:08d}" for s in (2, 5))
    before = consolidated_state_dict(good, json.loads((good / "fathom_complete.json").read_text()))
    after = consolidated_state_dict(last, json.loads((last / "fathom_complete.json").read_text()))
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "a skipped step changed the weights"


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2])  # a rollback loads partitioned optimizer state
def test_a_loss_spike_rolls_back_and_skips_its_batches(tiny_data, tmp_path, zero):
    out = tmp_path / "spike"
    proc = run_cli("train.py", *TINY_MODEL, f"data.path={tiny_data}", f"train.out_dir={out}", "train.max_steps=20",
                   "train.log_every=1", "train.micro_batch_size=8", "train.save_every=5", "monitor.every=5",
                   "train.spike_factor=2", "train.spike_window=5", "train.inject_spike=1:13", f"train.zero_stage={zero}")
    assert "step 13: loss spike; rolled back to step 10, skipping 24 samples" in proc.stderr
    lines = read_jsonl(out / "metrics.jsonl")
    assert [r for r in lines if "rollback_from" in r] == [{"step": 10, "rollback_from": 13, "skipped_samples": 24}]
    train = [r for r in lines if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 21))  # the rolled-back steps are logged once
    assert train[10]["samples"] == train[9]["samples"] + 24 + 8  # step 11 starts after the skipped batches
    assert max(r["loss"] for r in train) < 10  # the spiked update was never applied
    assert [r["step"] for r in read_jsonl(out / "monitors.jsonl.gz")] == [0, 5, 10, 15, 20]


@pytest.mark.slow
def test_two_ranks_logging_every_few_steps_never_see_a_spike_in_a_healthy_run(tiny_data, tmp_path):
    """The logged loss is the mean over ranks; the spike check compares each rank's own loss with its own
    history, on logging steps too (an in-place all-reduce once made every logging step W times larger,
    and with spike_factor < W every one of them rolled back, forever)."""
    out = tmp_path / "spike2"
    run_cli("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()), "train.py",
            *TINY_MODEL, f"data.path={tiny_data}", f"train.out_dir={out}", "train.max_steps=20", "train.log_every=5",
            "train.micro_batch_size=4", "train.save_every=5", "monitor.every=0", "train.spike_factor=1.5",
            "train.spike_window=5", env={"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}, timeout=300)
    lines = read_jsonl(out / "metrics.jsonl")
    assert not [r for r in lines if "rollback_from" in r]
    assert [r["step"] for r in lines if "loss" in r] == [5, 10, 15, 20]
    entropy = next(r["unigram_entropy"] for r in lines if "unigram_entropy" in r)
    assert all(abs(r["loss"] - entropy) < 1 for r in lines if "loss" in r)  # the mean over ranks, not their sum


def test_a_build_lock_left_by_a_killed_build_is_named_not_waited_on(tiny_data, tmp_path):
    # torch waits forever on a JIT build's lock file; a fresh one may be a build in progress
    extensions = tmp_path / "torch_extensions"
    old, fresh = extensions / "deepspeed_shm_comm" / "lock", extensions / "py311_cpu" / "cpu_adam" / "lock"
    for lock in (old, fresh):
        lock.parent.mkdir(parents=True)
        lock.touch()
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))
    out = tmp_path / "run"
    proc = run_cli("train.py", *TINY_MODEL, f"data.path={tiny_data}", f"train.out_dir={out}", check=False,
                   env={"TORCH_EXTENSIONS_DIR": str(extensions)}, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        f"error: {old} is the lock of a torch extension build that never finished (60 minutes old): every run would "
        f"wait on it forever. Delete it (rm {old}) unless a build is still running"]
    assert not out.exists()
