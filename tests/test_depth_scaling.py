"""model.depth_scaling: the branch multiplier and the optimizer groups equal their formulas
(model/residual.py, model/optimizer_groups.py) for every preset, and change nothing at L = L_base."""

import copy

import pytest
import torch

from configs import load_config
from model import Transformer
from model.optimizer_groups import parameter_groups

PRESETS = ["vanilla", "pre", "deepnorm", "surgery", "spectral", "gapfree", "shaped"]
SHAPE = ["model.d_model=16", "model.n_heads=4", "model.vocab_size=50", "model.max_seq_len=32", "train.seq_len=32",
         "train.lr=3e-3", "train.adam_eps=1e-6", "train.weight_decay=0.1"]


def config(preset, layers, alpha, base=12, *extra):
    return load_config([f"configs/methods/{preset}.yaml"], [
        *SHAPE, f"model.n_layers={layers}", f"model.depth_scaling.alpha={alpha}",
        f"model.depth_scaling.base_layers={base}", *extra])


def build(cfg, seed=0):
    torch.manual_seed(seed)
    return Transformer(cfg.model)


# the parameters that act on the stream outside every branch, by name, per norm
def expected_stream(model, norm):
    names = {"token_embedding.weight", "position_embedding.weight", "lm_head.bias"}
    if norm == "pre":
        names |= {"final_norm.weight", "final_norm.bias"}
    else:  # post-norm and DeepNorm: the LayerNorm after each residual add normalizes the stream itself
        names |= {f"blocks.{i}.{join}.norm.{w}" for i in range(len(model.blocks))
                  for join in ("attn_residual", "mlp_residual") for w in ("weight", "bias")}
    return names


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("layers", [2, 16])
@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_branch_multipliers_and_groups_equal_the_formulas(preset, layers, alpha):
    cfg = config(preset, layers, alpha)
    model = build(cfg)
    r, m = layers / 12, (12 / layers) ** alpha
    for block in model.blocks:
        for join in (block.attn_residual, block.mlp_residual):
            assert join.multiplier == pytest.approx(m, rel=1e-15)
            # the method's own scales are untouched: DeepNorm's skip weight, shaped's gains
            assert getattr(join, "alpha", 1.0) == pytest.approx((2 * layers) ** 0.25 if preset == "deepnorm" else 1.0)
        if preset == "shaped":
            assert block.attn_residual.gain.item() == pytest.approx(1.0)
            assert block.mlp_residual.gain.item() == pytest.approx(0.42 / layers**0.5)

    groups = {g["name"]: g for g in parameter_groups(model, cfg.train)}
    names = {id(p): n for n, p in model.named_parameters()}
    stream = {names[id(p)] for g in groups.values() if g["name"].startswith("stream") for p in g["params"]}
    assert stream == expected_stream(model, cfg.model.norm) & {n for n, p in model.named_parameters() if p.requires_grad}
    everything = [p for g in groups.values() for p in g["params"]]
    assert len(everything) == len({id(p) for p in everything}) == sum(p.requires_grad for p in model.parameters())
    for name, g in groups.items():
        branch = name.startswith("branch")
        assert g["lr"] == pytest.approx(3e-3 * (r ** (alpha - 1) if branch else 1.0), rel=1e-12)
        assert g["eps"] == pytest.approx(1e-6 * (m if branch else 1.0), rel=1e-12)
        decay = 0.1 * (r ** (1 - alpha) if branch else 1.0) if name.endswith("_decay") and "no_decay" not in name else 0.0
        assert g["weight_decay"] == pytest.approx(decay, rel=1e-12)
        assert all((p.dim() >= 2) == ("no_decay" not in name) for p in g["params"])


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("layers", [2, 16])
def test_the_stack_norm_rule_scales_the_lr_of_the_norms_after_each_add(preset, layers):
    """model.depth_scaling.stack_norm_rule: post-norm's and DeepNorm's LNs after each residual add get
    lr x L_base/L, eps and no decay as the stream's; every other group is as without the rule."""
    cfg = config(preset, layers, 1.0, 12, "model.depth_scaling.stack_norm_rule=true")
    model, plain = build(cfg), build(config(preset, layers, 1.0))

    def named_groups(model):
        names = {id(p): n for n, p in model.named_parameters()}
        return {g["name"]: dict(g, params=[names[id(p)] for p in g["params"]]) for g in parameter_groups(model, cfg.train)}

    with_rule, without = named_groups(model), named_groups(plain)
    stack = {n for n in expected_stream(model, cfg.model.norm) if n.startswith("blocks.")}
    assert set(with_rule.get("stack_norms", {"params": []})["params"]) == stack
    if stack:
        g = with_rule["stack_norms"]
        assert (g["lr"], g["eps"], g["weight_decay"]) == pytest.approx((3e-3 * 12 / layers, 1e-6, 0.0), rel=1e-12)
    for name, g in without.items():
        assert with_rule[name]["params"] == [n for n in g["params"] if n not in stack]
        assert (with_rule[name]["lr"], with_rule[name]["eps"]) == (g["lr"], g["eps"])


@pytest.mark.parametrize("preset", ["vanilla", "pre"])
def test_the_multiplier_scales_each_branch_output(preset):
    """Post-norm LN(x + m·f(x)) and pre-norm x + m·f(LN(x)): the same as the unscaled model with each
    branch's last projection (W_O and MLP-down) multiplied by m."""
    torch.set_default_dtype(torch.float64)
    try:
        scaled = build(config(preset, 16, 1.0))
        plain = build(config(preset, 16, 0.0))
        with torch.no_grad():
            for block in plain.blocks:
                block.attn.value_output.output.weight.mul_(12 / 16)
                block.mlp.down.weight.mul_(12 / 16)
        idx = torch.randint(0, 50, (2, 20))
        assert torch.allclose(scaled(idx), plain(idx), atol=1e-12, rtol=0)
        assert not torch.allclose(build(config(preset, 16, 0.0))(idx), plain(idx), atol=1e-6)
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("preset", ["vanilla", "shaped", "pre"])
def test_at_the_base_depth_depth_scaling_changes_nothing(preset):
    """At L = L_base the multiplier and every optimizer rule are 1: the same logits and the same weights
    after AdamW steps, bit for bit, as the preset without depth scaling."""
    runs = []
    for alpha in (0.0, 1.0):
        cfg = config(preset, 4, alpha, 4)
        model = build(cfg)
        opt = torch.optim.AdamW(parameter_groups(model, cfg.train), betas=(0.9, 0.98))
        idx = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1))
        for _ in range(3):
            loss = torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.roll(-1, 1).flatten())
            loss.backward()
            opt.step()
            opt.zero_grad()
        runs.append(copy.deepcopy(model.state_dict()))
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_off_keeps_the_two_groups_in_checkpoint_order():
    """Without depth scaling: decayed matrices, then the rest (the order a ZeRO-0 bf16 checkpoint's
    fp32 masters are read back in)."""
    cfg = config("shaped", 3, 0.0)
    groups = parameter_groups(build(cfg), cfg.train)
    assert [g["name"] for g in groups] == ["decay", "no_decay"]
    assert [(g["lr"], g["eps"], g["weight_decay"]) for g in groups] == [(3e-3, 1e-6, 0.1), (3e-3, 1e-6, 0.0)]


def test_alpha_outside_the_unit_interval_is_refused():
    from configs import ConfigError

    with pytest.raises(ConfigError, match=r"model.depth_scaling.alpha=2.0 is not allowed: it must be a number in \[0, 1\]"):
        config("vanilla", 4, 2.0)
