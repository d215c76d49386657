"""The DeepSpeed config generated from Fathom's, so that one YAML drives every launcher."""

import contextlib
import json

from configs import ConfigError


def grad_accum_steps(train, world_size):
    """Micro-steps per optimizer step. With train.global_batch set, derived so that the global batch
    stays the same whatever the number of ranks (a resume on more or fewer GPUs sees the same data)."""
    if not train.global_batch:
        return train.grad_accum
    per_step = train.micro_batch_size * world_size
    if train.global_batch % per_step:
        raise ConfigError(
            f"train.global_batch={train.global_batch} is not divisible by train.micro_batch_size="
            f"{train.micro_batch_size} x {world_size} ranks: choose a multiple of {per_step}")
    return train.global_batch // per_step


def deepspeed_config(train, precision, grad_accum):
    cfg = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": {"stage": train.zero_stage},
        # off: ZeRO-1/2's per-tensor check (two isfinite per gradient tensor); GuardedAdamW checks the
        # global norm instead (launch/nonfinite.py). On under offload, where the CPU Adam is not Fathom's
        "bf16": {"enabled": precision == "bf16", "check_grad_overflow": bool(train.offload_optimizer)},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        # Fathom logs itself (metrics.jsonl, TensorBoard, tqdm); DeepSpeed's own prints would interleave
        "steps_per_print": 1 << 30,
        # Fathom passes launch.nonfinite.GuardedAdamW, an AdamW subclass ZeRO does not know by name
        "zero_allow_untested_optimizer": True,
        "wall_clock_breakdown": False,
    }
    if train.zero_stage == 3:
        # the optimizer steps one sub-group at a time with three fp32 temporaries its size; DeepSpeed's
        # 1e9 makes that this GPU's whole partition (2.4 GB per GPU at 1,000 layers x d_model 1,024 on 64)
        cfg["zero_optimization"]["sub_group_size"] = 100_000_000
    if train.offload_optimizer:
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if train.deepspeed_config:
        with open(train.deepspeed_config) as f:
            merge(cfg, json.load(f))
    return cfg


def merge(base, extra):
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = value
    return base


def gathered(p):
    """The model's `gather` (model/init.py): a ZeRO-3 partition is whole for the block, then
    re-partitioned with rank 0's values, so every rank keeps the same init."""
    if hasattr(p, "ds_id"):
        import deepspeed

        return deepspeed.zero.GatheredParameters([p], modifier_rank=0)
    return contextlib.nullcontext()
