"""Collapse metrics on inputs with known answers, the monitor's outputs, and that monitoring does
not change the training trajectory."""

import json
import math

import pytest
import torch

from configs import load_config
from model import Transformer
from model.attention import MIXERS
from monitors.collapse import CollapseMonitor, block_hooks, significant
from monitors.metrics import (
    attention_entropy,
    cos_sim,
    sigma_ratio,
    stable_rank,
    stable_ranks,
    t_sim,
)
from tests.conftest import run_cli, train_tiny
from tests.test_train import read_jsonl


def test_cos_sim_identical_and_orthogonal_tokens():
    v = torch.randn(1, 1, 8)
    assert cos_sim(v.expand(2, 5, 8)) == pytest.approx(1.0)
    assert cos_sim(torch.eye(6).unsqueeze(0)) == pytest.approx(0.0, abs=1e-12)
    assert t_sim(v.expand(2, 5, 8)) == pytest.approx(1.0)


def test_stable_rank_of_known_singular_values():
    U, _ = torch.linalg.qr(torch.randn(7, 7, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))
    s = torch.tensor([3.0, 2.0, 1.0, 1.0, 0.5], dtype=torch.float64)
    x = (U[:, :5] * s) @ V.T
    assert stable_rank(x[None]) == pytest.approx((s**2).sum().item() / 9)
    assert stable_ranks(x[None])["stable_rank4"] == pytest.approx((s**4).sum().item() / 81)


def test_attention_entropy_and_sigma_ratio():
    T = 4
    uniform = torch.tril(torch.ones(T, T)) / torch.arange(1, T + 1)[:, None]
    assert attention_entropy(uniform[None, None]) == pytest.approx([sum(math.log(i) for i in range(1, T + 1)) / T])
    assert sigma_ratio(torch.diag(torch.tensor([2.0, 1.0, 0.5]))[None, None]) == pytest.approx(0.5)


@pytest.mark.parametrize("attention", ["softmax", "gapfree", "shaped"])
def test_monitor_attention_matrix_is_the_one_training_uses(attention):
    cfg = load_config([], [f"model.attention={attention}", "model.d_model=16", "model.n_heads=4"]).model
    mixer = MIXERS[attention](cfg)
    q, k, v = (torch.randn(2, 4, 9, 4, dtype=torch.float64) for _ in range(3))
    _, a = mixer.attention_matrices(q, k)
    assert torch.allclose(a @ v, mixer(q, k, v), atol=1e-10)


class FakeLog:
    enabled = True

    def __init__(self):
        self.messages, self.scalars, self.images = [], {}, {}
        self.tb = self

    def info(self, message):
        self.messages.append(message)

    def add_scalar(self, tag, value, step):
        self.scalars[tag, step] = value

    def add_figure(self, tag, figure, step):
        self.images[tag, step] = figure


def test_collapse_warning_once_per_layer_and_outputs(tmp_path):
    cfg = load_config([], ["model.n_layers=12", "model.d_model=32", "model.n_heads=2", "model.vocab_size=64",
                           "model.init=fanin", "monitor.collapse_threshold=0.9", "monitor.stable_rank_threshold=1"])
    torch.manual_seed(0)
    model = Transformer(cfg.model)  # vanilla post-norm with fan-in init: deep layers collapse at init
    log = FakeLog()
    monitor = CollapseMonitor(model, model, torch.randint(0, 64, (2, 16)), cfg.monitor, tmp_path, log)
    monitor.record(0)
    monitor.record(10)
    lines = read_jsonl(tmp_path / "monitors.jsonl.gz")
    assert [r["step"] for r in lines] == [0, 10] and len(lines[0]["layers"]) == 12
    values = [v for layer in lines[0]["layers"] for v in layer.values() if isinstance(v, float)]
    assert values and all(v == float(f"{v:.4g}") for v in values)  # written at 4 significant digits
    collapsed = [layer["layer"] for layer in lines[0]["layers"] if layer["cos_sim"] >= 0.9]
    assert collapsed and len(log.messages) == len(collapsed)  # once per layer, not per record
    assert f"layer {collapsed[0]} collapsed at step 0 (cos_sim" in log.messages[0]
    assert ("layers/cos_sim/layer_0011", 10) in log.scalars  # per-layer cards in a group of their own
    assert significant(log.scalars["collapse/deepest_layer_cos_sim", 10]) == lines[1]["layers"][-1]["cos_sim"]
    assert log.scalars["collapse/collapsed_layers", 0] == len(collapsed)
    assert significant(log.scalars["collapse/lowest_stable_rank", 0]) == min(x["stable_rank"] for x in lines[0]["layers"])
    ax, colorbar = log.images["collapse_heatmap/cos_sim", 10].axes
    assert (ax.get_xlabel(), ax.get_ylabel(), colorbar.get_ylabel()) == ("step", "layer", "cos_sim")
    assert ax.images[0].get_clim() == (0, 1)  # a fixed colour range: steps and runs compare


def test_monitor_metrics_equal_an_fp64_svd(tmp_path):
    """The fp32 block Krylov method (stable ranks, attention sigma_2/sigma_1) against an exact fp64 SVD
    of the same hidden states and attention matrices, as written, for every mixer, on models
    moved off their init (6e-4: the file keeps 4 significant digits); with monitor.heads the subset
    of heads is measured."""
    for attention, init in (("softmax", "fanin"), ("gapfree", "gpt2"), ("shaped", "gpt2")):
        cfg = load_config([], ["model.n_layers=6", "model.d_model=64", "model.n_heads=4", "model.vocab_size=64",
                               f"model.attention={attention}", f"model.init={init}", "monitor.heads=2"])
        torch.manual_seed(0)
        model = Transformer(cfg.model)
        for p in model.parameters():  # off the init's symmetries (shaped attention starts as exactly alpha I)
            p.data += 0.05 * torch.randn_like(p)
        idx = torch.randint(0, 64, (3, 48))  # above KRYLOV_STEPS x KRYLOV_BLOCK: the iterative path
        hidden, attention_matrices = [], []
        with torch.no_grad(), block_hooks(model, lambda i, out: hidden.append(out.double()), lambda mixer, qkv:
                                          attention_matrices.append(mixer.attention_matrices(
                                              qkv[0][:, [0, 3]], qkv[1][:, [0, 3]], [0, 3])[1])):
            model(idx)
        (tmp_path / attention).mkdir()
        CollapseMonitor(model, model, idx, cfg.monitor, tmp_path / attention, FakeLog()).record(0)
        layers = read_jsonl(tmp_path / attention / "monitors.jsonl.gz")[0]["layers"]
        for layer, x, a in zip(layers, hidden, attention_matrices):
            s = torch.linalg.svdvals(x)
            assert layer["stable_rank"] == pytest.approx(((s / s[:, :1]) ** 2).sum(-1).mean().item(), rel=6e-4)
            assert layer["stable_rank4"] == pytest.approx(((s / s[:, :1]) ** 4).sum(-1).mean().item(), rel=6e-4)
            s = torch.linalg.svdvals(a.double())
            assert layer["attn_sigma_ratio"] == pytest.approx((s[..., 1] / s[..., 0]).mean().item(), rel=6e-4)
            assert len(layer["attn_entropy"]) == 2


def test_krylov_metrics_of_collapsed_layers_equal_an_fp64_svd():
    """Nearly rank-1 hidden states and attention (a collapsed layer): the Krylov space runs out, and
    before its basis was made orthonormal the stable rank read 1.12 for 1.20, and below 1."""
    torch.manual_seed(0)
    for eps in (0.0, 1e-4, 1e-2, 0.3):
        x = torch.randn(4, 128, 1) * torch.randn(4, 1, 64) + 0.5 * torch.randn(4, 1, 64) + eps * torch.randn(4, 128, 64)
        s = torch.linalg.svdvals(x.double())
        ranks = stable_ranks(x)
        assert ranks["stable_rank"].item() == pytest.approx(((s / s[:, :1]) ** 2).sum(-1).mean().item(), rel=1e-4)
        assert ranks["stable_rank4"].item() == pytest.approx(((s / s[:, :1]) ** 4).sum(-1).mean().item(), rel=1e-4)
        a = torch.softmax(torch.randn(2, 1, 64) + eps * torch.randn(2, 64, 64), -1)  # every row alike
        s = torch.linalg.svdvals(a.double())
        assert sigma_ratio(a[:, None]).item() == pytest.approx((s[:, 1] / s[:, 0]).mean().item(), rel=1e-3, abs=1e-6)


def test_deep_models_get_layer_summaries_in_tensorboard(tmp_path):
    """Past 64 layers TensorBoard gets each metric's min, median and max over the layers, not a card per layer."""
    cfg = load_config([], ["model.n_layers=65", "model.d_model=16", "model.n_heads=2", "model.vocab_size=64"])
    model = Transformer(cfg.model)
    log = FakeLog()
    CollapseMonitor(model, model, torch.randint(0, 64, (2, 8)), cfg.monitor, tmp_path, log).record(0)
    layers = read_jsonl(tmp_path / "monitors.jsonl.gz")[0]["layers"]
    cos = sorted(layer["cos_sim"] for layer in layers)
    assert len(layers) == 65 and not any(tag.startswith("layers/cos_sim/layer_") for tag, _ in log.scalars)
    assert [significant(log.scalars[f"layers/cos_sim/{q}", 0]) for q in ("min", "median", "max")] == [cos[0], cos[32], cos[-1]]


@pytest.fixture(scope="session")
def unmonitored_run(tiny_data, tmp_path_factory):
    return train_tiny(tiny_data, tmp_path_factory.mktemp("runs") / "unmonitored", "monitor.every=0")


def test_monitors_do_not_change_the_trajectory(tiny_run, unmonitored_run):
    monitored = [r["loss"] for r in read_jsonl(tiny_run / "metrics.jsonl") if "loss" in r]
    plain = [r["loss"] for r in read_jsonl(unmonitored_run / "metrics.jsonl") if "loss" in r]
    assert monitored == plain
    assert not (unmonitored_run / "monitors.jsonl.gz").exists()


def test_monitor_file_and_plots_of_a_real_run(tiny_run, tmp_path):
    lines = read_jsonl(tiny_run / "monitors.jsonl.gz")
    assert [r["step"] for r in lines] == [0, 10, 20, 30, 40]
    keys = {"layer", "cos_sim", "t_sim", "stable_rank", "stable_rank4", "rms", "attn_entropy", "attn_sigma_ratio",
            "grad_norm", "update_ratio"}
    assert set(lines[1]["layers"][0]) == keys and len(lines[1]["layers"][0]["attn_entropy"]) == 2
    assert all(0 < layer["update_ratio"] < 1 and layer["grad_norm"] > 0 for layer in lines[1]["layers"])
    proc = run_cli("-m", "monitors.plot", "--run", str(tiny_run), "--output", str(tmp_path), "--metrics", "cos_sim")
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["cos_sim_heatmap.png", "cos_sim_vs_depth.png"]
    assert "cos_sim_heatmap.png" in proc.stdout


@pytest.mark.slow
def test_probe_cli_reports_every_layer(tiny_data, tmp_path):
    common = ["-m", "monitors.probe", "--config", "configs/methods/vanilla.yaml", "model.init=fanin", "model.d_model=32",
              "model.n_heads=2", "model.max_seq_len=32", "train.seq_len=32", f"data.path={tiny_data}", "--json"]
    one = json.loads(run_cli(*common, "model.n_layers=3").stdout)
    assert [r["layer"] for r in one["layers"]] == [0, 1, 2]
    assert {"cos_sim", "t_sim", "stable_rank", "rms"} <= set(one["layers"][0])
    many = json.loads(run_cli(*common, "--depths", "2,24", "--plot", str(tmp_path / "p.png")).stdout)
    deep = many["depths"]["24"]["layers"]
    assert len(deep) == 24 and deep[-1]["cos_sim"] > 0.9  # vanilla post-norm with fan-in init collapses
    assert (tmp_path / "p.png").is_file()


def test_collapse_cli_measures_a_checkpoint_as_the_monitor_did(tiny_run):
    """tools.collapse on the run's last checkpoint gives the monitor's last record at that step."""
    out = json.loads(run_cli("-m", "tools.collapse", "--run", str(tiny_run), "--json").stdout)
    record = read_jsonl(tiny_run / "monitors.jsonl.gz")[-1]
    assert out["step"] == record["step"] == 40
    for now, then in zip(out["layers"], record["layers"], strict=True):
        for key in ("cos_sim", "t_sim", "stable_rank", "rms", "attn_sigma_ratio"):
            assert significant(now[key]) == pytest.approx(then[key], rel=2e-4), key
    assert out["collapsed_layers"] == 0


def test_the_update_ratio_of_evenly_spaced_blocks_only(tmp_path):
    """monitor.update_layers bounds what is copied before the step: the first, the last and blocks
    evenly between them get |dW| / |W|; every block gets its gradient norm."""
    cfg = load_config([], ["model.n_layers=12", "model.d_model=32", "model.n_heads=2", "model.vocab_size=64",
                           "monitor.update_layers=3"])
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = CollapseMonitor(model, model, torch.randint(0, 64, (2, 16)), cfg.monitor, tmp_path, FakeLog())
    model(torch.randint(0, 64, (2, 16))).logsumexp(-1).mean().backward()
    before = [torch.cat([p.detach().flatten().clone() for p in block.parameters()]) for block in model.blocks]
    grads = [torch.cat([p.grad.flatten() for p in block.parameters()]) for block in model.blocks]
    monitor.before_step()
    optimizer.step()
    monitor.record(1)
    layers = read_jsonl(tmp_path / "monitors.jsonl.gz")[0]["layers"]
    assert [layer["layer"] for layer in layers if "update_ratio" in layer] == [0, 6, 11]
    for layer in layers:
        i = layer["layer"]
        assert layer["grad_norm"] == significant(grads[i].double().norm().item())
        if i in (0, 6, 11):  # SGD: |dW| = lr |g|
            assert layer["update_ratio"] == pytest.approx(0.1 * grads[i].norm().item() / before[i].norm().item(), rel=1e-3)
