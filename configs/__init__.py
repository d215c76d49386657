"""Load a Fathom config: YAML files merged in order over the typed schema, then dotted overrides.

    cfg = load_config(["configs/methods/shaped.yaml"], ["model.n_layers=8"])
    cfg.model.n_layers  # 8

Every problem (missing file, unknown key, wrong type, value out of range, impossible combination)
raises ConfigError with one line that names the key and what is allowed.
"""

import dataclasses
import difflib
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from configs.schema import SCHEMA_VERSION, FathomConfig, ModelConfig

__all__ = ["ConfigError", "FathomConfig", "ModelConfig", "load_config", "saved_config", "schema_fields", "to_yaml",
           "exit_on_error"]

# Keys added to the schema after Fathom first wrote a config.yaml, by the format version that has
# them, each with the value that does what Fathom did before the key existed. A run's own config
# then loads as the run ran: a cell trained before the LM head had a bias is read with
# head_bias=none, not with today's default.
SINCE = {
    1: {
        "model.qk_init": "base", "model.head_bias": "none", "model.tie_embeddings": True,
        "model.spectral.init": "equal", "model.shaped.temperature": "width",
        "model.shaped.trainable_branch_gains": False,
        "model.depth_scaling.alpha": 0.0, "model.depth_scaling.base_layers": 12,
        "model.depth_scaling.optimizer_rules": True,
        "train.adam_eps": 1e-8, "train.final_eval_windows": 0, "train.allow_data_change": False,
        "train.overwrite": False, "train.compile": False, "train.wandb_project": "", "train.peak_tflops": 0.0,
        "train.profile_steps": "",
        "data.tokenizer": "bpe", "data.mix": [],
        "monitor.stable_rank_threshold": 1.0,  # collapse was called by cosine alone
    },
    2: {"monitor.update_layers": 0},  # every block's update ratio
    3: {"monitor.seq_len": 0, "monitor.heads": 0},  # the probe at train.seq_len, every head
    4: {"model.depth_scaling.stack_norm_rule": False},
}


class ConfigError(ValueError):
    """A bad config value, named by key, with what is allowed."""


def schema_fields(cls=FathomConfig, prefix=""):
    """Yield (dotted key, dataclass field) for every leaf of the schema, in declaration order."""
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        if dataclasses.is_dataclass(f.type):
            yield from schema_fields(f.type, key + ".")
        else:
            yield key, f


def _unknown_key(key):
    keys = [k for k, _ in schema_fields()]
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}?" if close else "see the key table in docs/configuration.md"
    return ConfigError(f"unknown config key {key!r}: {hint}")


def _leaves(mapping, prefix=""):
    for key, value in mapping.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


# where a run came from (launch/provenance.py): train.py writes it into config.yaml; a record, not a setting
PROVENANCE = "provenance"


def _settings(loaded):
    """A YAML mapping's settings: without a provenance record, and upgraded to today's format if
    Fathom wrote it in an older one."""
    if PROVENANCE in loaded:
        loaded = loaded.copy()
        del loaded[PROVENANCE]
    version = _version(loaded)
    return _as_it_ran(loaded, version) if version is not None and version < SCHEMA_VERSION else loaded


def _version(loaded):
    """The format of a YAML mapping that Fathom wrote (train.py's config.yaml, an export's), or None for
    one a person wrote. Before format 1 there was no version key, but such a file holds every key of
    its time: all of today's but those added since (a hand-written file never names them all)."""
    container = OmegaConf.to_container(loaded)
    if "schema_version" in container:
        return container["schema_version"]
    added = {key for keys in SINCE.values() for key in keys} | {"schema_version"}
    first = {key for key, _ in schema_fields()} - added
    return 0 if first <= set(_leaves(container)) else None


def _as_it_ran(loaded, version):
    """A config Fathom wrote in an older format, upgraded: the keys it lacks take the values it ran with."""
    present = set(_leaves(OmegaConf.to_container(loaded)))
    for since, keys in SINCE.items():
        if version < since:
            for key, value in keys.items():
                if key not in present:
                    OmegaConf.update(loaded, key, value, force_add=True)
    OmegaConf.update(loaded, "schema_version", SCHEMA_VERSION, force_add=True)
    return loaded


def saved_config(mapping):
    """The config of a run from what it saved (config.yaml, a checkpoint marker's copy), read as it
    ran whatever Fathom version wrote it."""
    loaded = OmegaConf.create(mapping) if not isinstance(mapping, DictConfig) else mapping
    return OmegaConf.to_object(_merge(OmegaConf.structured(FathomConfig), _settings(loaded), "saved config"))


def _merge(base, other, source):
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as e:
        key = e.full_key or "?"
        if type(e).__name__ == "ConfigKeyError":
            raise _unknown_key(key) from None
        leaf = dict(schema_fields()).get(key)
        expected = getattr(leaf.type, "__name__", leaf.type) if leaf else "another type"
        got = OmegaConf.select(other, key, throw_on_missing=False)
        raise ConfigError(f"{key}={got!r} ({source}) is not allowed: it must be of type {expected}") from None


def _parse_override(item):
    if "=" not in item or item.startswith("="):
        raise ConfigError(f"bad override {item!r}: write key=value, e.g. model.n_layers=48")
    key, value = item.split("=", 1)
    if key not in dict(schema_fields()):
        raise _unknown_key(key)
    return key, value


def _override(key, value):
    """A one-key config. String keys take the text as it is (YAML would read 1:30 as the number 90);
    the others are read as YAML scalars, so 3e-4, true and 12 get their types."""
    if dict(schema_fields())[key].type is not str:
        return OmegaConf.from_dotlist([f"{key}={value}"])
    nested = value
    for part in reversed(key.split(".")):
        nested = {part: nested}
    return OmegaConf.create(nested)


def _check(cfg):
    """Per-key choices and ranges from the schema, then rules that involve several keys."""
    for key, f in schema_fields():
        value = OmegaConf.select(cfg, key)
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            raise ConfigError(f"{key}={value!r} is not allowed: choose one of {', '.join(map(str, choices))}")
        check = f.metadata.get("check")
        if check is not None and not check[0](value):
            raise ConfigError(f"{key}={value!r} is not allowed: it must be {check[1]}")
    m, t = cfg.model, cfg.train
    if m.d_model % m.n_heads:
        raise ConfigError(
            f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}: "
            f"choose n_heads among {[h for h in range(1, m.d_model + 1) if m.d_model % h == 0]}"
        )
    if t.seq_len > m.max_seq_len:
        raise ConfigError(f"train.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}: "
                          "lower train.seq_len or raise model.max_seq_len")
    if cfg.monitor.seq_len > m.max_seq_len:
        raise ConfigError(f"monitor.seq_len={cfg.monitor.seq_len} exceeds model.max_seq_len={m.max_seq_len}: "
                          "lower monitor.seq_len (0 probes train.seq_len tokens)")
    if cfg.monitor.heads > m.n_heads:
        raise ConfigError(f"monitor.heads={cfg.monitor.heads} exceeds model.n_heads={m.n_heads}: "
                          f"choose 1 to {m.n_heads}, or 0 for every head")
    if t.offload_optimizer and t.zero_stage == 0:
        raise ConfigError("train.offload_optimizer=true needs train.zero_stage >= 1: set train.zero_stage=2")
    if t.deepspeed_config and not Path(t.deepspeed_config).is_file():
        raise ConfigError(f"train.deepspeed_config={t.deepspeed_config!r} not found: pass an existing DeepSpeed JSON file")
    if m.surgery.site == "residual" and m.surgery.tau == 1.0 and m.norm != "pre":
        raise ConfigError("model.surgery.tau=1.0 at model.surgery.site=residual makes position 1 a constant after the "
                          "LayerNorm (its cumulative mean is itself): use tau < 1 or model.surgery.site=attn_out")
    for key in ("inject_nonfinite", "inject_spike"):
        spec = getattr(t, key)
        if spec and int(spec.split(":")[0]) >= m.n_layers:
            raise ConfigError(f"train.{key}={spec!r} names layer {spec.split(':')[0]}, the model has layers "
                              f"0..{m.n_layers - 1}")
    if m.spectral.lambda_min > m.spectral.lambda_max:
        raise ConfigError(f"model.spectral.lambda_min={m.spectral.lambda_min} exceeds "
                          f"model.spectral.lambda_max={m.spectral.lambda_max}")


def load_config(paths=(), overrides=()):
    """Typed defaults ← each YAML file in order ← each `key=value` override; validated."""
    cfg = OmegaConf.structured(FathomConfig)
    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(path)!r} not found: pass an existing YAML file, e.g. configs/methods/shaped.yaml")
        try:
            loaded = OmegaConf.load(p)
        except Exception as e:  # a YAML syntax error: name the file, keep the parser's first line
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(loaded, type(cfg)):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping such as 'model: {{n_layers: 48}}'")
        cfg = _merge(cfg, _settings(loaded), path)
    for item in overrides:
        key, value = _parse_override(item)
        cfg = _merge(cfg, _override(key, value), "command line")
    _check(cfg)
    return OmegaConf.to_object(cfg)


def to_yaml(cfg, provenance=None):
    """cfg as YAML; with `provenance`, followed by the record of where the run came from."""
    text = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    return text + OmegaConf.to_yaml({PROVENANCE: provenance}) if provenance else text


def exit_on_error(fn, *args, **kwargs):
    """Run fn; turn a ConfigError into one line on stderr and exit code 2 (for command-line tools)."""
    try:
        return fn(*args, **kwargs)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
