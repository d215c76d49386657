"""Config: YAML over typed defaults, dotted overrides, and one clear line for every mistake."""

import pytest

from configs import ConfigError, load_config, schema_fields
from configs.schema import SCHEMA_VERSION
from tests.conftest import ROOT


def test_the_default_run_is_what_the_readme_says():
    """`python train.py` reads configs/default.yaml: README's quick start describes it in numbers."""
    from model import Transformer

    cfg = load_config([ROOT / "configs/default.yaml"], ["model.vocab_size=8192"])  # the built-in corpus' BPE
    m, t = cfg.model, cfg.train
    readme = (ROOT / "README.md").read_text()
    assert (f"a **{m.n_layers}-layer**, d_model {m.d_model}, {m.n_heads}-head {m.norm}-norm LM" in readme
            and f"trained for {t.max_steps} steps of {t.micro_batch_size} × {t.seq_len} tokens" in readme)
    assert f"({Transformer(m).num_parameters() / 1e6:.1f} M parameters)" in readme
    assert (m.n_layers, m.norm, m.surgery.site, m.head_bias) == (32, "post", "none", "log_unigram")


def test_later_files_win_then_overrides(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("model: {n_layers: 12, d_model: 96}\ntrain: {lr: 0.01}\n")
    b.write_text("model: {n_layers: 24}\n")
    cfg = load_config([a, b], ["train.lr=3e-4", "model.surgery.tau=0.25"])
    assert (cfg.model.n_layers, cfg.model.d_model, cfg.train.lr, cfg.model.surgery.tau) == (24, 96, 3e-4, 0.25)


def test_each_preset_alone_gives_its_method_and_keys_combine_them():
    cfg = load_config(["configs/default.yaml", "configs/methods/shaped.yaml"], ["model.n_layers=8"])
    assert (cfg.model.attention, cfg.model.surgery.site, cfg.model.n_layers, cfg.model.d_model) == ("shaped", "none", 8, 64)
    cfg = load_config(["configs/methods/shaped.yaml", "configs/methods/vanilla.yaml"])
    assert (cfg.model.attention, cfg.model.norm) == ("softmax", "post")
    cfg = load_config(["configs/methods/shaped.yaml"], ["model.surgery.site=residual"])
    assert (cfg.model.attention, cfg.model.surgery.site) == ("shaped", "residual")


def test_unknown_key_in_a_file_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {n_layerz: 4}\n")
    with pytest.raises(ConfigError, match="did you mean model.n_layers"):
        load_config([bad])


def test_string_overrides_are_taken_as_written():
    # YAML would read 1:30 as the sexagesimal number 90
    assert load_config([], ["train.inject_nonfinite=1:30"]).train.inject_nonfinite == "1:30"


# The other bad inputs are checked through train.py, as a user meets them, in tests/test_robustness.py.


def test_docs_document_every_key():
    page = (ROOT / "docs" / "configuration.md").read_text()
    missing = [key for key, _ in schema_fields() if f"`{key}`" not in page]
    assert not missing, f"docs/configuration.md lacks {missing}: regenerate the table with `python -m configs --update-docs`"


def test_a_run_config_from_before_a_key_existed_loads_as_it_ran(tmp_path):
    """A config.yaml that Fathom wrote before model.head_bias (format 0, no schema_version) ran without
    a head bias: it loads with head_bias=none, and a sweep cell of that time is reproducible from it. A
    hand-written file without the key gets today's default."""
    from omegaconf import OmegaConf

    from configs import saved_config, to_yaml

    old = ROOT / "bench/results/sweep_cpu/vanilla-L48-gpt2/config.yaml"
    assert "head_bias" not in old.read_text() and "schema_version" not in old.read_text()
    for cfg in (load_config([old]), saved_config(OmegaConf.load(old))):
        assert (cfg.model.head_bias, cfg.model.shaped.temperature, cfg.model.spectral.init) == ("none", "width", "equal")
        assert (cfg.train.final_eval_windows, cfg.model.depth_scaling.alpha, cfg.schema_version) == (0, 0.0, SCHEMA_VERSION)
        assert cfg.monitor.update_layers == 0  # every block's update ratio, as it recorded
        assert (cfg.model.n_layers, cfg.model.init) == (48, "gpt2")  # what it holds is kept
    # written today: versioned, and read back unchanged
    today = load_config(["configs/methods/vanilla.yaml"])
    (tmp_path / "config.yaml").write_text(to_yaml(today))
    assert f"schema_version: {SCHEMA_VERSION}" in to_yaml(today) and load_config([tmp_path / "config.yaml"]) == today
    # format 1 (before monitor.update_layers): versioned, and upgraded by what came after it
    one = ROOT / "bench/results/lr_transfer/vanilla+model.depth_scaling.alpha=1+train.lr=3e-3-L48-s1337/config.yaml"
    assert "schema_version: 1" in one.read_text() and load_config([one]).monitor.update_layers == 0
    # format 2 (before monitor.seq_len and monitor.heads): the probe ran at train.seq_len over every head
    two = ROOT / "bench/results/lr_transfer/vanilla+train.lr=3e-3-L48-s1337/config.yaml"
    assert "schema_version: 2" in two.read_text() and "\n  heads:" not in two.read_text()
    assert (load_config([two]).monitor.seq_len, load_config([two]).monitor.heads) == (0, 0)
    # a person's own partial file is no run config: the keys it leaves out take today's defaults
    (tmp_path / "mine.yaml").write_text("model: {n_layers: 48}\n")
    assert load_config([tmp_path / "mine.yaml"]).model.head_bias == "log_unigram"
