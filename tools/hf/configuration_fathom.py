"""The transformers config of a Fathom model: ModelConfig's own fields, plus the names transformers reads.

config.json holds every ModelConfig field under its Fathom name (the method sections as nested
dicts); `attribute_map` lets transformers and lm-eval find the usual ones (hidden_size,
max_position_embeddings, tie_word_embeddings, ...) without a second copy of each value.
"""

import dataclasses

from transformers import PretrainedConfig

from configs.schema import ModelConfig


def from_dict(cls, values):
    """A config dataclass from plain values, its nested sections built from their dicts too
    (OmegaConf does this in Fathom; the exported folder does not depend on it)."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in values:
            value = values[f.name]
            kwargs[f.name] = from_dict(f.type, value) if dataclasses.is_dataclass(f.type) else value
    return cls(**kwargs)


class FathomHFConfig(PretrainedConfig):
    model_type = "fathom"
    attribute_map = {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "max_position_embeddings": "max_seq_len",
        "tie_word_embeddings": "tie_embeddings",
    }

    def __init__(self, **kwargs):
        fathom = {f.name: kwargs.pop(f.name) for f in dataclasses.fields(ModelConfig) if f.name in kwargs}
        super().__init__(**kwargs)
        # after the base class, whose defaults (tie_word_embeddings) would otherwise overwrite Fathom's values
        for key, value in dataclasses.asdict(from_dict(ModelConfig, fathom)).items():
            setattr(self, key, value)

    def model_config(self):
        return from_dict(ModelConfig, {f.name: getattr(self, f.name) for f in dataclasses.fields(ModelConfig)})
