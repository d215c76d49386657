"""Train a Fathom language model.

    python train.py [--config FILE ...] [key=value ...]
    deepspeed --num_gpus N train.py ...      torchrun --nproc_per_node N train.py ...

The story of a run: validate the config (before torch is imported), find or prepare the data,
check the checkpoint it resumes from, start the process group, build the model and its DeepSpeed
engine, restore it, then loop: micro-batches -> optimizer step -> log -> evaluate -> checkpoint.
Everything is written into train.out_dir.
"""

import argparse
import math
import sys
import time
from pathlib import Path

from configs import ConfigError, exit_on_error, load_config, to_yaml
from data.meta import data_fingerprint
from data.resolve import resolve_data
from launch.checkpoint import find_resume_point
from launch.deepspeed_config import deepspeed_config, gathered, grad_accum_steps
from launch.distributed import check_extension_build_locks, fill_launcher_env
from launch.preemption import StopSignal
from launch.provenance import provenance
from launch.run_dir import RunDir, write_atomically

DEFAULT_CONFIG = "configs/default.yaml"


def parse_args(argv):
    ap = argparse.ArgumentParser(description="Train a Fathom language model.")
    ap.add_argument("--config", action="append", default=[],
                    help=f"YAML file; repeat to merge, later wins (default: {DEFAULT_CONFIG})")
    ap.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    ap.add_argument("overrides", nargs="*", help="dotted key=value, e.g. model.n_layers=96")
    return ap.parse_intermixed_args(argv)


def check_fresh_start(cfg):
    """A fresh start never writes into another run's directory: its checkpoints would be pruned in
    favour of the old run's newer ones, its logs truncated, and a later resume would continue the old run."""
    earlier = RunDir(cfg.train.out_dir).describe_run()
    if earlier and not cfg.train.overwrite:
        how = "train.resume=none" if cfg.train.resume == "none" else "it has no complete checkpoint to resume from"
        raise ConfigError(f"train.out_dir={cfg.train.out_dir!r} holds another run ({earlier}) and {how}: pass a new "
                          "train.out_dir, train.resume=auto to continue that run, or train.overwrite=true to move it "
                          "aside first")


def lr_factor(step, cfg):
    """Linear warmup, then cosine decay to min_lr_ratio at max_steps."""
    t = cfg.train
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def gradient_norm(engine, model):
    """The global gradient norm before clipping, or None where DeepSpeed records it itself.

    DeepSpeed's optimizer wrappers (ZeRO, bf16, fp16) record the norm during step(); the bare
    fp32 optimizer of ZeRO-0 does not, and there the full, all-reduced grads sit on the module."""
    import torch

    if hasattr(engine.optimizer, "_global_grad_norm"):
        return None
    return torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]).item()


def evaluate(engine, batches, device):
    from launch.validation import validation_loss

    engine.eval()
    loss = validation_loss(engine, batches, device)
    engine.train()
    return loss


def peak_memory_mb():
    """Peak memory of this rank: GPU memory allocated on CUDA, else the process's max RSS."""
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train_step(engine, model, optimizer, batches, first_sample, grad_accum, want_grad_norm, before_step=None):
    """One optimizer step over grad_accum micro-batches; returns (summed loss, grad norm or None,
    skipped). before_step, if given, runs after the last backward, before the optimizer step (monitors).

    `skipped` is the engine's own word, whoever checked the step (launch/nonfinite.py)."""
    import torch
    import torch.nn.functional as F

    loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)
    grad_norm = None
    for micro in range(grad_accum):
        x, y = batches.micro_batch_at(first_sample, micro, engine.device)
        loss = F.cross_entropy(engine(x).float().flatten(0, 1), y.flatten())
        engine.backward(loss)
        loss_sum += loss.detach().double()
        if micro == grad_accum - 1:
            optimizer.loss = loss_sum
            if want_grad_norm:
                grad_norm = gradient_norm(engine, model)
            if before_step:
                before_step()
        engine.step()
    if want_grad_norm and grad_norm is None:
        grad_norm = engine.get_global_grad_norm()
    return loss_sum, grad_norm, not engine.was_step_applied()


def make_optimizer(model, t):
    from model.optimizer_groups import parameter_groups

    groups = parameter_groups(model, t)
    if t.offload_optimizer:
        # ZeRO-Offload steps on the CPU: DeepSpeed's vectorized CPU Adam, several times torch's AdamW there
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.adam_eps, adamw_mode=True)
    from launch.nonfinite import GuardedAdamW

    return GuardedAdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.adam_eps)


def train(cfg, data_path, meta, grad_accum, resume, stop_signal):
    import deepspeed
    import torch
    import torch.distributed as dist
    from omegaconf import OmegaConf

    from data.loader import TrainBatches, ValBatches
    from data.meta import train_token_counts
    from launch.checkpoint import Checkpointer
    from launch.distributed import check_ranks_agree, init_distributed
    from launch.nonfinite import (
        DIVERGED,
        FaultInjection,
        agreed_min_layer,
        describe,
        first_nonfinite_layer,
        guard,
    )
    from launch.preemption import REQUEUE, request_requeue
    from launch.profiling import StepProfiler
    from launch.run_log import RunLog
    from launch.step_policy import StepPolicy
    from model import Transformer
    from model.flops import flops_per_token, peak_tflops
    from monitors.collapse import CollapseMonitor

    rank, world_size, _ = init_distributed()
    check_ranks_agree({"resume step": resume.step if resume else 0, "tokenizer": meta["tokenizer"]["hash"],
                       "data": data_fingerprint(meta), "config": to_yaml(cfg)}, rank)
    from deepspeed.accelerator import get_accelerator

    t = cfg.train
    cuda = get_accelerator().device_name() == "cuda"
    precision = ("bf16" if cuda else "fp32") if t.precision == "auto" else t.precision
    run_dir = RunDir(t.out_dir)
    if rank == 0:
        if not resume and t.overwrite and run_dir.describe_run():
            print(f"train.overwrite=true: moved the earlier run to {run_dir.move_aside()}", file=sys.stderr)
        run_dir.path.mkdir(parents=True, exist_ok=True)
        write_atomically(run_dir.config, to_yaml(cfg, provenance(data_fingerprint(meta))))
    dist.barrier()

    ds_config = deepspeed_config(t, precision, grad_accum)
    if resume and resume.needs_universal(world_size):
        ds_config["checkpoint"] = {"load_universal": True}
    torch.manual_seed(t.seed)
    # ZeRO-3 partitions every parameter as it is created, so no rank ever holds the whole model
    with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=t.zero_stage == 3):
        model = Transformer(cfg.model, gather=gathered)
    if cfg.model.head_bias == "log_unigram":
        model.init_head_bias(train_token_counts(data_path, meta), gather=gathered)
    # what this rank holds right after construction (a partition of each parameter under ZeRO-3)
    held = torch.tensor([float(sum(getattr(p, "ds_tensor", p).numel() for p in model.parameters()))],
                        device=get_accelerator().current_device_name())
    held_per_rank = [torch.zeros_like(held) for _ in range(world_size)]
    dist.all_gather(held_per_rank, held)
    model.checkpoint_every = t.activation_checkpointing
    if t.compile:
        # per block: every block has the same code, so one compiled graph serves them all (minutes
        # less than compiling a 1000-layer model whole); embeddings and head stay eager
        for block in model.blocks:
            block.compile()
    optimizer = make_optimizer(model, t)
    injections = [FaultInjection(spec, model, factor) for spec, factor in
                  ((t.inject_nonfinite, float("nan")), (t.inject_spike, 100.0)) if spec]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    guard(engine, optimizer)
    device = engine.device

    checkpointer = Checkpointer(engine, cfg, rank, world_size, precision, meta["tokenizer"]["hash"], data_fingerprint(meta))
    checkpointer.remove_incomplete()
    start_step, samples_seen = 0, 0
    if resume:
        checkpointer.load(resume)
        start_step, samples_seen = resume.step, resume.marker["samples_seen"]
    sources = meta.get("mix", data_path)  # a directory, or data.mix's directories and weights
    batches = TrainBatches(sources, t.seq_len, t.micro_batch_size, grad_accum, world_size, rank, t.seed)
    val_batches = ValBatches(sources, t.seq_len, t.micro_batch_size, world_size, rank,
                             f"first:{t.eval_batches * t.micro_batch_size}")
    tokens_per_step = batches.global_batch * t.seq_len
    model_flops = flops_per_token(cfg.model, t.seq_len, tokens_per_step)
    peak = peak_tflops(torch.cuda.get_device_name(device) if cuda else "", t.peak_tflops)
    profiler = StepProfiler(t.profile_steps, run_dir.tensorboard, rank)

    log = RunLog(run_dir.path, rank == 0, t.max_steps, start_step, t.wandb_project,
                 OmegaConf.to_container(OmegaConf.structured(cfg)))
    log.info(f"model: {model.num_parameters():,} parameters, {cfg.model.n_layers} layers, norm={cfg.model.norm}, "
             f"attention={cfg.model.attention}, weights={cfg.model.weights}, surgery={cfg.model.surgery.site}; "
             f"{world_size} rank(s) x micro batch {t.micro_batch_size} x grad accum {grad_accum} = global batch "
             f"{batches.global_batch} x {t.seq_len} tokens, ZeRO-{t.zero_stage}, {precision}"
             + (f"; resumed from {resume.path}" if resume else ""))
    if not resume:
        log.write({"step": 0, "unigram_entropy": meta["unigram_entropy"], "parameters": model.num_parameters(),
                   "parameters_per_rank": [int(h.item()) for h in held_per_rank], "global_batch": batches.global_batch},
                  "data")
    monitor = None
    if cfg.monitor.every:
        probe = ValBatches(sources, cfg.monitor.seq_len or t.seq_len, cfg.monitor.batch, 1, 0, f"first:{cfg.monitor.batch}")
        probe_tokens = next(probe.batches(device))[0]
        monitor = CollapseMonitor(engine, model, probe_tokens, cfg.monitor, run_dir.path, log, start_step)
        if start_step == 0:
            monitor.record(0)

    policy = StepPolicy(t, stop_signal)
    stop_signal.release()
    exit_code = 0
    tick = time.perf_counter()
    step = start_step
    while step < t.max_steps:
        step_start = time.perf_counter()
        done = step + 1
        logging_step = done % t.log_every == 0 or done == t.max_steps
        monitoring = monitor is not None and monitor.due(done)
        for injection in injections:
            injection.begin_step(done)
        profiler.begin(done)
        loss_sum, grad_norm, skipped = train_step(engine, model, optimizer, batches, samples_seen, grad_accum,
                                                  logging_step, monitor.before_step if monitoring else None)
        profiler.end(done)
        if skipped:
            in_a_row, in_all = policy.skipped_step()
            x, _ = batches.micro_batch_at(samples_seen, 0, device)
            where = describe(model, agreed_min_layer(first_nonfinite_layer(model, engine, x), device),
                             getattr(optimizer, "bad_params", []))
            log.write({"step": done, "skipped": True, "nonfinite": where, "bad_steps": in_all}, "guard")
            log.info(f"step {done}: non-finite loss or gradient, first in {where}; step skipped "
                     f"({in_a_row} in a row, {in_all} in all)")
        samples_seen += batches.global_batch
        for line in batches.epochs_begun(samples_seen - batches.global_batch, samples_seen):
            log.info(line)
        if monitoring:
            monitor.record(done)
        if logging_step:
            # a copy: loss_sum stays this rank's own, which the spike check below compares with its history
            global_loss = loss_sum.clone()
            dist.all_reduce(global_loss)
            loss_value = global_loss.item() / (grad_accum * world_size)
            elapsed, tick = time.perf_counter() - tick, time.perf_counter()
            steps_in_window = t.log_every if done % t.log_every == 0 else done % t.log_every
            tokens_per_s = tokens_per_step * min(steps_in_window, done - start_step) / elapsed
            tflops = model_flops * tokens_per_s / world_size / 1e12  # per rank, as the peak is per device
            record = {"step": done, "loss": loss_value, "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                      "tokens_per_s": tokens_per_s, "model_flops_per_token": model_flops, "tflops_per_rank": tflops,
                      **({"mfu": tflops / peak} if peak else {}),
                      "samples": samples_seen, **batches.mix_record(samples_seen), "peak_memory_mb": peak_memory_mb()}
            log.write(record, "train")
            deepest = {"deep_cos": monitor.deepest_cos} if monitor and monitor.deepest_cos is not None else {}
            log.progress(done, loss=loss_value, tok_s=record["tokens_per_s"], **deepest)
        if done % t.eval_every == 0 or done == t.max_steps:
            val_loss = evaluate(engine, val_batches, device)
            log.write({"step": done, "val_loss": val_loss}, "val")
            log.info(f"step {done}: val_loss {val_loss:.4f} (unigram entropy {meta['unigram_entropy']:.4f})")
        if done == t.max_steps and t.final_eval_windows:
            # the score runs are compared by: the same windows, spread over the whole split, for every seed
            # and depth (the first windows alone can sit a third of a nat off a full pass)
            final = ValBatches(sources, t.seq_len, t.micro_batch_size, world_size, rank, f"spread:{t.final_eval_windows}")
            final_loss = evaluate(engine, final, device)
            log.write({"step": done, "final_eval_loss": final_loss, "eval_windows": final.num_windows}, "val")
            log.info(f"step {done}: final_eval_loss {final_loss:.4f} over {final.num_windows} windows spread over the "
                     "val split")

        decision = policy.after_step(done, loss_sum, grad_accum, skipped, time.perf_counter() - step_start)
        point = checkpointer.newest() if decision.roll_back else None
        if point:
            # back to the last checkpoint's weights, optimizer, schedule and RNG; the data goes on, so
            # the batches since that checkpoint (the spike's among them) are skipped
            checkpointer.load(point)
            log.rewind(point.step)
            if monitor:
                monitor.rewind(point.step)
            log.write({"step": point.step, "rollback_from": done,
                       "skipped_samples": samples_seen - point.marker["samples_seen"]}, "rollback")
            log.info(f"step {done}: loss spike; rolled back to step {point.step}, skipping "
                     f"{samples_seen - point.marker['samples_seen']} samples")
            step = point.step
            continue
        if decision.roll_back:
            log.info(f"step {done}: loss spike, but no checkpoint to roll back to yet; continuing")
        if decision.save:
            save_start = time.monotonic()
            checkpointer.save(done, samples_seen)
            policy.saved(save_start)
        if decision.stop == "diverged":
            log.info(f"stopped: {policy.bad_in_a_row} non-finite steps in a row (train.max_bad_steps), first in "
                     f"{where}; the checkpoint of step {done} holds the last good weights")
            exit_code = DIVERGED
            break
        if decision.stop:
            log.info(f"saved step {done} and stopped for {decision.stop}; the same command resumes")
            if decision.requeue:
                exit_code = REQUEUE
                if rank == 0:
                    request_requeue()
            break
        step += 1
    log.close()
    dist.barrier()
    return exit_code


def main(argv=None):
    started = time.monotonic()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    paths = args.config or [Path(__file__).parent / DEFAULT_CONFIG]
    cfg = exit_on_error(load_config, paths, args.overrides)
    # before the slow part of start-up: SIGTERM or SLURM's SIGUSR1 from here on saves after the first
    # step instead of killing the process (in the middle of a DeepSpeed op build, say, leaving its lock)
    stop_signal = StopSignal(cfg.train.time_limit_minutes, started)
    stop_signal.hold()
    data_path, meta = exit_on_error(resolve_data, cfg)
    _, world_size, _ = fill_launcher_env()
    grad_accum = exit_on_error(grad_accum_steps, cfg.train, world_size)
    resume = exit_on_error(find_resume_point, cfg, meta["tokenizer"]["hash"], data_fingerprint(meta))
    if not resume:
        exit_on_error(check_fresh_start, cfg)
    exit_on_error(check_extension_build_locks)
    raise SystemExit(train(cfg, data_path, meta, grad_accum, resume, stop_signal))


if __name__ == "__main__":
    main()
