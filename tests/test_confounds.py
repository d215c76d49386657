"""The switches behind the confounds of a method comparison (docs/results_confounds.md): the LM head's bias
and tying, each preset's init, the shaped temperature, the spectral spread at init, and collapse
called by cosine or stable rank."""

import math

import numpy as np
import pytest
import torch

from configs import load_config
from data.meta import read_prepared, train_token_counts
from model import Transformer
from monitors.metrics import collapsed, cos_sim, stable_rank

PRESETS = ["vanilla", "pre", "deepnorm", "surgery", "spectral", "gapfree", "shaped"]


def model_config(*overrides, preset=None):
    paths = [f"configs/methods/{preset}.yaml"] if preset else []
    base = ["model.n_layers=3", "model.d_model=16", "model.n_heads=4", "model.vocab_size=50", "model.max_seq_len=32",
            "train.seq_len=32"]
    return load_config(paths, base + list(overrides)).model


def test_log_unigram_bias_is_the_log_of_the_training_split_frequencies(tiny_data):
    meta = read_prepared(tiny_data)
    train = np.concatenate([np.fromfile(tiny_data / name, dtype=meta["dtype"]) for name in meta["splits"]["train"]["shards"]])
    counted = np.bincount(train, minlength=meta["tokenizer"]["vocab_size"])
    recorded = train_token_counts(tiny_data, meta)
    assert np.array_equal(recorded, counted)
    assert np.array_equal(train_token_counts(tiny_data, {k: v for k, v in meta.items() if k != "train_token_counts"}), counted)

    model = Transformer(model_config("model.head_bias=log_unigram", f"model.vocab_size={len(counted)}"))
    assert torch.all(model.lm_head.bias == 0)  # until the trainer sets it from the data
    model.init_head_bias(recorded)
    seen = counted > 0
    expected = np.log(counted[seen] / counted.sum())
    assert np.allclose(model.lm_head.bias.detach().double().numpy()[seen], expected, rtol=0, atol=1e-6)
    # an untrained model with this bias predicts the unigram distribution: its loss is near the entropy
    p = counted[seen] / counted.sum()
    assert model.lm_head.bias.detach()[seen].double().exp().sum().item() == pytest.approx(1.0, abs=1e-6)
    assert -(p * np.log(p)).sum() == pytest.approx(meta["unigram_entropy"], rel=1e-9)


@pytest.mark.parametrize("tie", [True, False])
def test_tied_and_untied_heads(tie, tmp_path):
    from tools.pretrained import from_pretrained, save_pretrained

    cfg = load_config([], ["model.n_layers=2", "model.d_model=16", "model.n_heads=4", "model.vocab_size=50",
                           f"model.tie_embeddings={tie}", "model.head_bias=zero"])
    model = Transformer(cfg.model)
    assert (model.lm_head.weight is model.token_embedding.weight) == tie
    model(torch.randint(0, 50, (2, 8))).sum().backward()
    if not tie:  # two separate parameters, each with its own gradient
        assert model.lm_head.weight.grad is not None and model.token_embedding.weight.grad is not None
        assert not torch.equal(model.lm_head.weight.grad, model.token_embedding.weight.grad)
    extra = 0 if tie else 50 * 16
    assert model.num_parameters() == Transformer(load_config([], ["model.n_layers=2", "model.d_model=16",
                                                                   "model.n_heads=4", "model.vocab_size=50",
                                                                   "model.head_bias=none"]).model).num_parameters() + extra + 50
    save_pretrained(model, cfg, tmp_path)
    loaded = from_pretrained(tmp_path)
    idx = torch.randint(0, 50, (1, 8))
    assert torch.equal(loaded(idx), model.eval()(idx))


def test_post_norm_presets_start_without_the_residual_scaling():
    for preset in PRESETS:
        cfg = model_config("model.d_model=64", "model.n_layers=8", preset=preset)
        expected = {"pre": "gpt2", "deepnorm": "xavier"}.get(preset, "normal")
        assert cfg.init == expected, preset
    torch.manual_seed(0)
    model = Transformer(model_config("model.d_model=64", "model.n_layers=8", preset="vanilla"))
    assert model.blocks[0].mlp.down.weight.std().item() == pytest.approx(0.02, rel=0.05)
    torch.manual_seed(0)
    pre = Transformer(model_config("model.d_model=64", "model.n_layers=8", preset="pre"))
    assert pre.blocks[0].mlp.down.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)


def test_gapfree_starts_queries_and_keys_xavier_normal():
    torch.manual_seed(0)
    model = Transformer(model_config("model.d_model=64", preset="gapfree"))
    w_q, w_k = model.blocks[0].attn.query_key.weight.chunk(2)
    for w in (w_q, w_k):
        assert w.std().item() == pytest.approx(math.sqrt(2 / (64 + 64)), rel=0.05)
    assert model.blocks[0].mlp.up.weight.std().item() == pytest.approx(0.02, rel=0.05)


@pytest.mark.parametrize("temperature,scale", [("head", 1 / math.sqrt(4)), ("width", 1 / math.sqrt(16 * 4))])
def test_shaped_temperature(temperature, scale):
    model = Transformer(model_config(f"model.shaped.temperature={temperature}", preset="shaped"))
    assert model.blocks[0].attn.mixer.scale == pytest.approx(scale, rel=1e-12)


def test_shaped_branch_gains_are_trained_from_their_init():
    L = 3
    model = Transformer(model_config(preset="shaped"))
    join = model.blocks[0]
    assert isinstance(join.mlp_residual.gain, torch.nn.Parameter)
    assert join.mlp_residual.gain.item() == pytest.approx(0.42 / math.sqrt(L))
    assert join.attn_residual.gain.item() == pytest.approx(1.0)
    model(torch.randint(0, 50, (2, 8))).pow(2).mean().backward()
    assert join.mlp_residual.gain.grad.abs().item() > 0
    fixed = Transformer(model_config("model.shaped.trainable_branch_gains=false", preset="shaped"))
    assert fixed.blocks[0].mlp_residual.gain == pytest.approx(0.42 / math.sqrt(L))


@pytest.mark.parametrize("lo,hi", [(0.0, 1.0), (0.2, 0.6)])
def test_spectral_eigenvalues_start_spread_inside_their_range(lo, hi):
    torch.manual_seed(0)
    model = Transformer(model_config("model.d_model=64", f"model.spectral.lambda_min={lo}",
                                     f"model.spectral.lambda_max={hi}", preset="spectral"))
    eig = model.blocks[0].attn.value_output.eigenvalues().detach()
    assert torch.all(-eig >= lo) and torch.all(-eig <= hi)
    assert eig.std().item() > 0.2 * (hi - lo)  # uniform over the range has std (hi - lo) / sqrt(12)
    assert len(set(eig.tolist())) == 64
    equal = Transformer(model_config("model.spectral.init=equal", preset="spectral"))
    assert torch.allclose(equal.blocks[0].attn.value_output.eigenvalues(), torch.tensor(-0.5))


def test_collapse_is_called_by_stable_rank_when_cosine_misses_it():
    # rank 1, but the tokens point both ways along v: their mean is near 0 and so is their mean cosine
    torch.manual_seed(0)
    v = torch.randn(32)
    signs = torch.tensor([1.0, -1.0]).repeat(8)
    x = (signs * torch.rand(16).add(0.5))[:, None] * v[None, :]
    x = x[None]  # [B=1, T=16, d=32]
    layer = {"cos_sim": cos_sim(x), "stable_rank": stable_rank(x)}
    assert abs(layer["cos_sim"]) < 0.1 and layer["stable_rank"] == pytest.approx(1.0)
    assert collapsed(layer, 0.9, 1.2)
    assert not collapsed({"cos_sim": layer["cos_sim"], "stable_rank": 3.0}, 0.9, 1.2)
    assert collapsed({"cos_sim": 0.95, "stable_rank": 3.0}, 0.9, 1.2)
