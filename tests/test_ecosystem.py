"""Fitting the tools researchers use: the FLOPs count behind MFU, W&B (offline), plain log lines
when stderr is a file, profiler traces, and TensorBoard's summary group and labelled heatmaps."""

import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from configs import load_config
from model import Transformer
from model.flops import flops_per_token, matmul_parameters, peak_tflops
from tests.conftest import TINY_MODEL, run_cli


@pytest.mark.parametrize("overrides", [[], ["model.mlp_ratio=2", "model.n_layers=3", "model.tie_embeddings=false"]])
def test_flops_per_token_equals_torchs_count(overrides):
    cfg = load_config([], ["model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.vocab_size=100",
                           "model.max_seq_len=16", "train.seq_len=16", *overrides]).model
    model = Transformer(cfg)
    B, T = 3, 16
    x = torch.randint(0, 100, (B, T))
    # the math backend runs attention as matmuls the counter sees (fused CPU kernels are not counted)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    assert flops_per_token(cfg, T, B * T) * B * T == counter.get_total_flops()
    assert matmul_parameters(cfg) == sum(p.numel() for n, p in model.named_parameters()
                                         if p.dim() == 2 and n != "position_embedding.weight"
                                         and (n != "token_embedding.weight" or cfg.tie_embeddings))


def test_each_preset_adds_exactly_its_own_work_and_peaks_are_known():
    L, d, V, T, tokens = 4, 64, 257, 128, 2048
    # 6N (N: Q, K, V, O, MLP up and down at ratio 4, the head) + attention's 12·L·T·d
    vanilla = 6 * (L * (4 + 2 * 4) * d * d + V * d) + 12 * L * T * d
    extra = {"vanilla": 0, "pre": 0, "deepnorm": 0,
             "gapfree": 3 * 3 * d * L,  # 3 element-wise passes over [T, d] per layer, forward and backward
             "shaped": 3 * 8 * d * L, "surgery": 3 * 4 * d * L,
             "spectral": 3 * L * (4 * d**3 / 3 + d * d) / tokens}  # a d×d QR and U·diag(λ) per layer per forward
    for preset, added in extra.items():
        cfg = load_config([f"configs/methods/{preset}.yaml"], [f"model.n_layers={L}", f"model.d_model={d}",
                                                               f"model.vocab_size={V}"]).model
        assert flops_per_token(cfg, T, tokens) == pytest.approx(vanilla + added, rel=1e-12), preset
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0 and peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0 and peak_tflops("cpu") is None
    assert peak_tflops("anything", override=100.0) == 100.0


@pytest.fixture(scope="module")
def logged_run(tiny_data, tmp_path_factory):
    """A run with W&B offline and a profiled step, started twice (the second resumes); stderr is a
    pipe, as under SLURM or nohup."""
    out = tmp_path_factory.mktemp("ecosystem") / "run"
    common = [*TINY_MODEL, f"data.path={tiny_data}", f"train.out_dir={out}", "train.log_every=2", "monitor.every=4",
              "train.wandb_project=fathom-tests", "train.profile_steps=3:4"]
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    first = run_cli("train.py", *common, "train.max_steps=8", "train.stop_at_step=4", env=env)
    second = run_cli("train.py", *common, "train.max_steps=8", env=env)
    return out, first, second


def test_plain_log_lines_when_stderr_is_not_a_terminal(logged_run):
    _, first, second = logged_run
    assert "\r" not in first.stderr + second.stderr
    assert "step 2/8 loss=" in first.stderr and "step 8/8 loss=" in second.stderr


def test_wandb_offline_run_holds_the_scalars_and_resumes(logged_run):
    out, _, _ = logged_run
    run_id = (out / "wandb_id").read_text().strip()
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(run_id) for r in runs)  # one W&B run, resumed
    logged = b"".join(r.joinpath(f"run-{run_id}.wandb").read_bytes() for r in runs)
    for key in (b"train/loss", b"train/lr", b"train/grad_norm", b"train/tokens_per_s", b"train/tflops_per_rank",
                b"collapse/deepest_layer_cos_sim", b"layers/stable_rank/layer_0001", b"collapse_heatmap/cos_sim"):
        assert key in logged, key


def test_flops_fields_and_profiler_trace(logged_run):
    out, _, _ = logged_run
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if "loss" in r]
    assert all(r["model_flops_per_token"] > 0 and r["tflops_per_rank"] > 0 for r in train)
    assert all("mfu" not in r for r in train)  # no peak to compare with on a CPU
    traces = list((out / "tensorboard").glob("rank0.*.pt.trace.json"))
    assert len(traces) == 1 and json.loads(traces[0].read_text())["traceEvents"]


def test_tensorboard_groups_summaries_first(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tiny_run / "tensorboard"), size_guidance={"images": 0}).Reload()
    scalars = events.Tags()["scalars"]
    assert {"collapse/deepest_layer_cos_sim", "collapse/lowest_stable_rank", "collapse/collapsed_layers"} <= set(scalars)
    assert not any(t.startswith("collapse/") and "layer_0" in t for t in scalars)  # per-layer cards live elsewhere
    assert "layers/cos_sim/layer_0001" in scalars
    assert "collapse_heatmap/cos_sim" in events.Tags()["images"]


PRESETS = ["vanilla", "pre", "deepnorm", "surgery", "spectral", "gapfree", "shaped"]


def five_steps(preset, backend=None):
    # one block: train.compile compiles block by block, and each further block is only a recompile
    cfg = load_config([f"configs/methods/{preset}.yaml"], ["model.n_layers=1", "model.d_model=32", "model.n_heads=2",
                                                          "model.vocab_size=64", "model.max_seq_len=16",
                                                          "train.seq_len=16"]).model
    torch.manual_seed(0)
    model = Transformer(cfg)
    if backend:
        for block in model.blocks:  # as train.compile does
            block.compile(backend=backend)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batches = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(5):
        x = torch.randint(0, 64, (4, 16), generator=batches)
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.roll(-1, 1).flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_compiles_to_the_same_losses(preset):
    # aot_eager traces exactly what inductor gets (dynamo graphs, AOT autograd's backward) at a
    # fraction of the compile time; inductor's own kernels are checked end to end below
    assert five_steps(preset, "aot_eager") == pytest.approx(five_steps(preset), rel=1e-5)


@pytest.mark.slow
def test_train_compile_matches_eager(tiny_data, tmp_path):
    """train.compile=true with inductor, end to end, on shaped attention: its cumulative mean and
    per-head gains are the graph inductor could not compile on CUDA."""
    from tests.conftest import losses

    common = ["--config", "configs/methods/shaped.yaml", *TINY_MODEL, f"data.path={tiny_data}", "train.max_steps=20",
              "train.log_every=1", "monitor.every=0"]
    run_cli("train.py", *common, f"train.out_dir={tmp_path / 'eager'}")
    run_cli("train.py", *common, f"train.out_dir={tmp_path / 'compiled'}", "train.compile=true")
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-5)
