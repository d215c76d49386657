"""Two real processes on CPU (gloo) through the real launchers: deepspeed and torchrun agree, data
parallelism equals gradient accumulation, ZeRO stages and activation checkpointing do not change
the losses."""

import pytest
import torch

from configs import load_config
from launch.run_dir import read_jsonl
from launch.train_step import checkpoint_activations
from model import Transformer
from tests.conftest import STEPS, losses, train


@pytest.fixture(scope="session")
def distributed_runs(tiny_data, tmp_path_factory):
    """Each run once: name -> its run directory."""
    root = tmp_path_factory.mktemp("distributed")
    runs = {
        "deepspeed-zero0": ("deepspeed", []),
        "torchrun-zero0": ("torchrun", []),
        "python-accum2": ("python", ["train.grad_accum=2"]),
        "torchrun-zero1": ("torchrun", ["train.zero_stage=1"]),
        "torchrun-zero2-checkpointing": ("torchrun", ["train.zero_stage=2", "train.activation_checkpointing=1"]),
        "torchrun-zero3": ("torchrun", ["train.zero_stage=3"]),
        # DeepSpeed's CPU Adam steps the offloaded optimizer (its C++ op compiles once per machine)
        "torchrun-zero2-offload": ("torchrun", ["train.zero_stage=2", "train.offload_optimizer=true"]),
    }
    out = {}
    for name, (how, extra) in runs.items():
        # monitor.every=3: every launcher and ZeRO stage also runs the monitors' collective gradient reads
        train(how, root / name, tiny_data, *extra, "monitor.every=3")
        out[name] = root / name
    return out


def test_deepspeed_and_torchrun_log_identical_losses(distributed_runs):
    assert len(losses(distributed_runs["torchrun-zero0"])) == STEPS
    assert losses(distributed_runs["deepspeed-zero0"]) == losses(distributed_runs["torchrun-zero0"])


def test_two_ranks_equal_one_rank_with_grad_accum_2(distributed_runs):
    assert losses(distributed_runs["python-accum2"]) == pytest.approx(losses(distributed_runs["torchrun-zero0"]), rel=1e-5)


@pytest.mark.parametrize("run", ["torchrun-zero1", "torchrun-zero2-checkpointing", "torchrun-zero3", "torchrun-zero2-offload"])
def test_zero_stages_and_checkpointing_match_zero0(distributed_runs, run):
    assert losses(distributed_runs[run]) == pytest.approx(losses(distributed_runs["torchrun-zero0"]), rel=1e-5)


@pytest.mark.parametrize("run", ["torchrun-zero1", "torchrun-zero2-checkpointing", "torchrun-zero3", "torchrun-zero2-offload"])
def test_zero_stages_give_zero0s_update_ratios(distributed_runs, run):
    """Each rank copies only its own share of the fp32 weights and one all-reduce sums the norms:
    ZeRO-1/2/3, whose shares are partitions, give the update ratios of ZeRO-0, whose share is all."""
    def monitored(name):
        records = read_jsonl(distributed_runs[name] / "monitors.jsonl.gz")[1:]
        return [layer[key] for r in records for layer in r["layers"] for key in ("grad_norm", "update_ratio")]

    reference = monitored("torchrun-zero0")
    assert len(reference) > 2 and all(value > 0 for value in reference)
    assert monitored(run) == pytest.approx(reference, rel=2e-3)


def test_zero3_builds_the_model_partitioned(distributed_runs):
    """Under deepspeed.zero.Init each of 2 ranks holds half the parameters right after construction
    (a model larger than one rank's memory can be built); without ZeRO-3 each holds all of them."""
    def held(run):
        data = read_jsonl(distributed_runs[run] / "metrics.jsonl")[0]
        return data["parameters"], data["parameters_per_rank"]

    total, per_rank = held("torchrun-zero3")
    assert len(per_rank) == 2 and all(abs(n - total / 2) <= 0.01 * total for n in per_rank)
    total, per_rank = held("torchrun-zero0")
    assert per_rank == [total, total]


def test_activation_checkpointing_recomputes_blocks_and_gives_the_same_loss_and_gradients():
    cfg = load_config([], ["model.n_layers=4", "model.d_model=32", "model.n_heads=2", "model.vocab_size=64"])
    idx = torch.randint(0, 64, (2, 16))
    results = []
    for every, forwards in ((0, 4), (1, 8), (2, 6)):  # every k-th block runs again in backward
        torch.manual_seed(0)
        model = Transformer(cfg.model)
        checkpoint_activations(model.blocks, every)
        ran = []
        for block in model.blocks:
            block.attn.register_forward_pre_hook(lambda *_: ran.append(1))
        loss = model(idx).logsumexp(-1).mean()
        loss.backward()
        assert len(ran) == forwards, every
        assert [n for n, _ in model.named_parameters()] == [n for n, _ in Transformer(cfg.model).named_parameters()]
        results.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    for loss, grads in results[1:]:
        assert loss == results[0][0]
        assert all(torch.equal(a, b) for a, b in zip(grads, results[0][1]))


