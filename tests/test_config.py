"""Config: YAML over typed defaults, dotted overrides, and one clear line for every mistake."""

import pytest

from configs import ConfigError, load_config, schema_fields
from tests.conftest import ROOT, run_cli


def test_defaults_are_a_deep_post_norm_model():
    cfg = load_config()
    assert cfg.model.n_layers >= 32 and cfg.model.norm == "post"


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


@pytest.mark.parametrize("overrides,message", [
    (["model.n_layer=4"], "unknown config key 'model.n_layer': did you mean model.n_layers?"),
    (["trian.lr=1"], "did you mean train.lr?"),
    (["model.n_layers=abc"], "model.n_layers='abc' (command line) is not allowed: it must be of type int"),
    (["train.max_steps=-3"], "train.max_steps=-3 is not allowed: it must be a number > 0"),
    (["model.d_model=100", "model.n_heads=3"], "model.d_model=100 is not divisible by model.n_heads=3"),
    (["model.norm=sandwich"], "model.norm='sandwich' is not allowed: choose one of post, pre, deepnorm"),
    (["model.surgery.tau=1.5"], "model.surgery.tau=1.5 is not allowed: it must be a number in [0, 1]"),
    (["train.seq_len=512"], "train.seq_len=512 exceeds model.max_seq_len=256"),
    (["model.spectral.lambda_min=2"], "model.spectral.lambda_min=2.0 exceeds model.spectral.lambda_max=1.0"),
    (["n_layers"], "bad override 'n_layers': write key=value"),
    (["train.zero_stage=4"], "train.zero_stage=4 is not allowed: choose one of 0, 1, 2, 3"),
    (["train.offload_optimizer=true"], "train.offload_optimizer=true needs train.zero_stage >= 1"),
    (["train.deepspeed_config=nope.json"], "train.deepspeed_config='nope.json' not found"),
])
def test_bad_values_name_the_key_and_what_is_allowed(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config([], overrides)
    assert message in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file 'missing.yaml' not found"):
        load_config(["missing.yaml"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {n_layers: 4\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config([bad])
    bad.write_text("model: {n_layerz: 4}\n")
    with pytest.raises(ConfigError, match="did you mean model.n_layers"):
        load_config([bad])


@pytest.mark.parametrize("args", [
    ["model.n_layer=4"], ["model.d_model=100", "model.n_heads=3"], ["--config", "missing.yaml"],
    ["data.path=/nonexistent/data"],
])
def test_train_py_exits_2_with_one_line_before_importing_torch(args):
    proc = run_cli("-X", "importtime", "train.py", *args, check=False)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    assert len(errors) == 1 and errors[0].startswith("error: "), proc.stderr[-2000:]
    assert "| torch" not in proc.stderr and "| deepspeed" not in proc.stderr


def test_readme_documents_every_key():
    readme = (ROOT / "README.md").read_text()
    missing = [key for key, _ in schema_fields() if f"`{key}`" not in readme]
    assert not missing, f"README.md lacks {missing}: regenerate the table with `python -m configs`"
