"""Load a trained model: from a run directory's checkpoint, or from an exported folder.

A run's checkpoint may be partitioned (ZeRO 1-3, bf16) over any number of ranks; DeepSpeed's own
`zero_to_fp32` consolidates it into one fp32 state dict. ZeRO-0 checkpoints hold the whole module.
Everything a bad input can break (no checkpoint, a tokenizer that is not the run's) is checked
first and reported as one line (ConfigError).
"""

from pathlib import Path

from omegaconf import OmegaConf

from configs import ConfigError, saved_config
from launch.checkpoint import complete_checkpoints, load_safely, verify
from launch.run_dir import RunDir


def run_checkpoint(run, tag=None):
    """The complete checkpoint folder of a run (newest, or `tag`) and its marker."""
    run = RunDir(run)
    if not run.config.is_file():
        raise ConfigError(f"{run.path} is not a Fathom run directory (no config.yaml): pass a train.out_dir")
    done = complete_checkpoints(run.checkpoints)
    if tag:
        path = run.checkpoints / tag
        if path not in done:
            raise ConfigError(f"{run.path} has no complete checkpoint {tag!r}: choose one of {[p.name for p in done]}")
    elif not done:
        raise ConfigError(f"{run.path} has no complete checkpoint: train it (checkpoints are saved at the end and "
                          "every train.save_every steps)")
    else:
        path = done[-1]
    return path, verify(path, None)


def run_config(marker):
    return saved_config(marker["config"])


def consolidated_state_dict(path, marker):
    """The fp32 weights of a checkpoint: for bf16, the optimizer's fp32 master copy, not the rounded module."""
    if marker["zero_stage"] == 0:
        states = load_safely(path / "mp_rank_00_model_states.pt")
        weights = {k: v.float() for k, v in states["module"].items()}
        if "fp32_groups" in (states.get("optimizer") or {}):
            weights.update(master_weights(states, marker))
        return weights
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)


def master_weights(states, marker):
    """{name: fp32 master weight} of a ZeRO-0 bf16 checkpoint. DeepSpeed saves them per optimizer
    group without names, in the order of model.optimizer_groups. Each master must round to the saved
    module weight."""
    import torch

    from model import Transformer
    from model.optimizer_groups import parameter_groups

    cfg = run_config(marker)
    with torch.device("meta"):  # names, shapes and flags only
        model = Transformer(cfg.model)
    ordered = [p for group in parameter_groups(model, cfg.train) for p in group["params"]]
    groups = states["optimizer"]["fp32_groups"]
    masters = dict(zip(map(id, ordered), (t for group in groups for t in group)))
    # a tied head is one parameter under two names: both get its master
    weights = {n: masters[id(p)] for n, p in model.named_parameters(remove_duplicate=False) if id(p) in masters}
    module = states["module"]
    if sum(map(len, groups)) != len(ordered) or not all(
            m.shape == module[n].shape and torch.equal(m.to(module[n].dtype), module[n]) for n, m in weights.items()):
        raise ValueError("its fp32 master weights do not match its parameters")
    return weights


def load_run(run, tag=None, data=None):
    """(config, model in eval mode, checkpoint marker, data directory, data meta) of a run."""
    from data.meta import DataError
    from data.resolve import resolve_data
    from model import Transformer

    path, marker = run_checkpoint(run, tag)
    cfg = run_config(marker)
    if data:
        cfg.data.path, cfg.data.mix = str(data), []
    data_path, meta = resolve_data(cfg)
    if meta["tokenizer"]["hash"] != marker["tokenizer_hash"]:
        raise ConfigError(f"the tokenizer of {data_path} is not the one {path} was trained with: "
                          "evaluate on data prepared with the run's tokenizer (`data.prepare --tokenizer RUN_TOKENIZER`)")
    model = Transformer(cfg.model)
    try:
        model.load_state_dict(consolidated_state_dict(path, marker))
    except (DataError, OSError, RuntimeError, ValueError) as e:
        raise ConfigError(f"checkpoint {path} could not be loaded ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    return cfg, model.eval(), marker, data_path, meta


def save_pretrained(model, cfg, directory, tokenizer=None):
    """model.safetensors and config.yaml for `tools.pretrained.from_pretrained`; config.json, the code it names
    and (given the tokenizer file) a fast tokenizer for transformers' Auto classes, in the same folder."""
    from safetensors.torch import save_model

    from tools.hf.save import save_hf

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # handles the tied embedding / LM head; transformers reads only files marked as PyTorch's
    save_model(model, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    save_hf(cfg.model, directory, tokenizer)


def from_pretrained(directory):
    from safetensors.torch import load_model

    from model import Transformer

    directory = Path(directory)
    cfg = OmegaConf.load(directory / "config.yaml")
    model_cfg = saved_config(cfg).model
    model = Transformer(model_cfg)
    load_model(model, str(directory / "model.safetensors"))
    return model.eval()

