"""Train a Fathom language model.

    python train.py [--config FILE ...] [key=value ...]
    deepspeed --num_gpus N train.py ...      torchrun --nproc_per_node N train.py ...

The story of a run: validate the config (before torch is imported), find or prepare the data,
start the process group, build the model and its DeepSpeed engine, then loop: micro-batches ->
optimizer step -> log -> evaluate. Everything is written into train.out_dir.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

from configs import ConfigError, exit_on_error, load_config, to_yaml
from launch.deepspeed_config import deepspeed_config, grad_accum_steps
from launch.distributed import fill_launcher_env


DEFAULT_CONFIG = "configs/default.yaml"


def parse_args(argv):
    ap = argparse.ArgumentParser(description="Train a Fathom language model.")
    ap.add_argument("--config", action="append", default=[],
                    help=f"YAML file; repeat to merge, later wins (default: {DEFAULT_CONFIG})")
    ap.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    ap.add_argument("overrides", nargs="*", help="dotted key=value, e.g. model.n_layers=96")
    return ap.parse_intermixed_args(argv)


def resolve_data(cfg):
    """The prepared data directory and its checked meta.json; the built-in corpus is prepared on first use."""
    from data.meta import DataError, read_prepared

    if cfg.data.path:
        path = Path(cfg.data.path).expanduser()
    else:
        from data.stdlib_corpus import stdlib_dataset

        path = stdlib_dataset(cfg.data.cache_dir, cfg.data.vocab_size)
    try:
        meta = read_prepared(path)
    except DataError as e:
        raise ConfigError(f"data.path: {e}") from None
    cfg.model.vocab_size = meta["tokenizer"]["vocab_size"]
    return path, meta


def lr_factor(step, cfg):
    """Linear warmup, then cosine decay to min_lr_ratio at max_steps."""
    t = cfg.train
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model, weight_decay):
    """Decay matrices only: norms, shaped gains and spectral eigenvalues are not pulled to 0."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


class RunLog:
    """metrics.jsonl, TensorBoard and the progress bar; every write happens on rank 0 only."""

    def __init__(self, out_dir, enabled, total_steps):
        self.enabled = enabled
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        self.metrics = open(out_dir / "metrics.jsonl", "w")
        self.tb = SummaryWriter(str(out_dir / "tensorboard"))
        self.bar = tqdm(total=total_steps, desc="train", dynamic_ncols=True, mininterval=1.0)

    def write(self, record, tb_prefix):
        if not self.enabled:
            return
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tb.add_scalar(f"{tb_prefix}/{key}", value, record["step"])

    def progress(self, step, **postfix):
        if self.enabled:
            self.bar.n = step
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=True)

    def info(self, message):
        if self.enabled:
            self.bar.write(message, file=sys.stderr)

    def close(self):
        if self.enabled:
            self.bar.close()
            self.tb.close()
            self.metrics.close()


def gradient_norm(engine, model):
    """The global gradient norm before clipping, or None where DeepSpeed records it itself.

    DeepSpeed's optimizer wrappers (ZeRO, bf16, fp16) record the norm during step(); the bare
    fp32 optimizer of ZeRO-0 does not, and there the full, all-reduced grads sit on the module."""
    import torch

    if hasattr(engine.optimizer, "_global_grad_norm"):
        return None
    return torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]).item()


def evaluate(engine, val_batches, device):
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    engine.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for x, y in val_batches.batches(device):
            logits = engine(x)
            total[0] += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").double()
            total[1] += y.numel()
    dist.all_reduce(total)
    engine.train()
    return (total[0] / total[1]).item()


def peak_memory_mb():
    """Peak memory of this rank: GPU memory allocated on CUDA, else the process's max RSS."""
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train(cfg, data_path, meta, grad_accum):
    import deepspeed
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from data.loader import TrainBatches, ValBatches
    from launch.distributed import init_distributed
    from model import Transformer

    rank, world_size, _ = init_distributed()
    from deepspeed.accelerator import get_accelerator

    t = cfg.train
    cuda = get_accelerator().device_name() == "cuda"
    precision = ("bf16" if cuda else "fp32") if t.precision == "auto" else t.precision
    out_dir = Path(t.out_dir)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(to_yaml(cfg))

    torch.manual_seed(t.seed)
    model = Transformer(cfg.model)
    model.checkpoint_every = t.activation_checkpointing
    optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(t, precision, grad_accum)
    )
    device = engine.device
    batches = TrainBatches(data_path, t.seq_len, t.micro_batch_size, grad_accum, world_size, rank, t.seed)
    val_batches = ValBatches(data_path, t.seq_len, t.micro_batch_size, t.eval_batches, world_size, rank)
    tokens_per_step = batches.global_batch * t.seq_len

    log = RunLog(out_dir, rank == 0, t.max_steps)
    log.info(f"model: {model.num_parameters():,} parameters, {cfg.model.n_layers} layers, norm={cfg.model.norm}, "
             f"attention={cfg.model.attention}, weights={cfg.model.weights}, surgery={cfg.model.surgery.site}; "
             f"{world_size} rank(s) x micro batch {t.micro_batch_size} x grad accum {grad_accum} = global batch "
             f"{batches.global_batch} x {t.seq_len} tokens, ZeRO-{t.zero_stage}, {precision}")
    log.write({"step": 0, "unigram_entropy": meta["unigram_entropy"], "parameters": model.num_parameters(),
               "global_batch": batches.global_batch}, "data")

    step_loss = torch.zeros((), dtype=torch.float64, device=device)
    tick = time.perf_counter()
    for step in range(t.max_steps):
        step_loss.zero_()
        done = step + 1
        logging_step = done % t.log_every == 0 or done == t.max_steps
        for micro in range(grad_accum):
            x, y = batches.micro_batch_at(step, micro, device)
            loss = F.cross_entropy(engine(x).float().flatten(0, 1), y.flatten())
            engine.backward(loss)
            if logging_step and micro == grad_accum - 1:
                grad_norm = gradient_norm(engine, model)
            engine.step()
            step_loss += loss.detach().double()
        if logging_step:
            dist.all_reduce(step_loss)
            loss_value = step_loss.item() / (grad_accum * world_size)
            elapsed, tick = time.perf_counter() - tick, time.perf_counter()
            steps_in_window = t.log_every if done % t.log_every == 0 else done % t.log_every
            grad_norm = engine.get_global_grad_norm() if grad_norm is None else grad_norm
            record = {"step": done, "loss": loss_value, "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                      "tokens_per_s": tokens_per_step * steps_in_window / elapsed, "peak_memory_mb": peak_memory_mb()}
            log.write(record, "train")
            log.progress(done, loss=loss_value, tok_s=record["tokens_per_s"])
        if done % t.eval_every == 0 or done == t.max_steps:
            val_loss = evaluate(engine, val_batches, device)
            log.write({"step": done, "val_loss": val_loss}, "val")
            log.info(f"step {done}: val_loss {val_loss:.4f} (unigram entropy {meta['unigram_entropy']:.4f})")
    log.close()
    dist.barrier()


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    paths = args.config or [Path(__file__).parent / DEFAULT_CONFIG]
    cfg = exit_on_error(load_config, paths, args.overrides)
    data_path, meta = exit_on_error(resolve_data, cfg)
    _, world_size, _ = fill_launcher_env()
    grad_accum = exit_on_error(grad_accum_steps, cfg.train, world_size)
    train(cfg, data_path, meta, grad_accum)


if __name__ == "__main__":
    main()
