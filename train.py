"""Train a Fathom language model.

    python train.py [--config FILE ...] [key=value ...]
    deepspeed --num_gpus N train.py ...      torchrun --nproc_per_node N train.py ...

The story of a run: validate the config (before torch is imported), find or prepare the data,
check the checkpoint it resumes from, start the process group, build the model and its DeepSpeed
engine, restore it, then loop: micro-batches -> optimizer step -> log -> evaluate -> checkpoint.
Everything is written into train.out_dir.
"""

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from configs import ConfigError, exit_on_error, load_config, to_yaml
from data.meta import data_fingerprint
from data.resolve import resolve_data
from launch.checkpoint import find_resume_point
from launch.deepspeed_config import deepspeed_config, gathered, grad_accum_steps
from launch.distributed import check_extension_build_locks, fill_launcher_env
from launch.plan import check_gpu_memory
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


def make_optimizer(model, t):
    from model.optimizer_groups import parameter_groups

    groups = parameter_groups(model, t)
    if t.offload_optimizer:
        # ZeRO-Offload steps on the CPU: DeepSpeed's vectorized CPU Adam, several times torch's AdamW there
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.adam_eps, adamw_mode=True)
    from launch.nonfinite import GuardedAdamW

    return GuardedAdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.adam_eps)


def build_engine(cfg, precision, grad_accum, resume, world_size, data_path, meta):
    """The model, built partitioned under ZeRO-3, and its DeepSpeed engine; returns (engine, model,
    optimizer, scheduler, parameters each rank holds)."""
    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from data.meta import train_token_counts
    from launch.nonfinite import guard
    from launch.train_step import checkpoint_activations
    from model import Transformer
    from model.optimizer_groups import lr_factor

    t = cfg.train
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
    checkpoint_activations(model.blocks, t.activation_checkpointing)
    if t.compile:
        # per block: every block has the same code, so one compiled graph serves them all (minutes
        # less than compiling a 1000-layer model whole); embeddings and head stay eager
        for block in model.blocks:
            block.compile()
    optimizer = make_optimizer(model, t)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    guard(engine, optimizer)
    return engine, model, optimizer, scheduler, [int(h.item()) for h in held_per_rank]


@dataclass
class Run:
    """What the training loop drives, on each rank: built by build_run."""
    rank: int
    start_step: int
    scheduler: object
    checkpointer: object
    batches: object
    train_step: object
    log: object
    metrics: object
    evaluation: object
    monitor: object  # None when monitor.every is 0


def build_run(cfg, data_path, meta, grad_accum, resume):
    """Join the process group, write the run directory's config, build the engine, restore the
    checkpoint `resume` names (if any), and set up the data, logging, evaluation and monitors."""
    import torch
    from omegaconf import OmegaConf

    from data.loader import TrainBatches, ValBatches
    from launch.checkpoint import Checkpointer
    from launch.distributed import check_ranks_agree, init_distributed
    from launch.metrics import TrainMetrics
    from launch.run_log import RunLog
    from launch.train_step import TrainStep
    from launch.validation import Evaluation
    from model.flops import peak_tflops
    from monitors.collapse import CollapseMonitor

    rank, world_size, _ = init_distributed()
    check_ranks_agree({"resume step": resume.step if resume else 0, "tokenizer": meta["tokenizer"]["hash"],
                       "data": data_fingerprint(meta), "config": to_yaml(cfg)}, rank)
    t = cfg.train
    cuda, precision = device_precision(t)
    run_dir = prepare_run_dir(cfg, meta, resume, rank)

    engine, model, optimizer, scheduler, held_per_rank = build_engine(cfg, precision, grad_accum, resume, world_size,
                                                                      data_path, meta)
    checkpointer = Checkpointer(engine, cfg, rank, world_size, precision, meta["tokenizer"]["hash"], data_fingerprint(meta))
    checkpointer.remove_incomplete()
    if resume:
        checkpointer.load(resume)
    start_step = resume.step if resume else 0
    sources = meta.get("mix", data_path)  # a directory, or data.mix's directories and weights
    batches = TrainBatches(sources, t.seq_len, t.micro_batch_size, grad_accum, world_size, rank, t.seed)
    train_step = TrainStep(engine, model, optimizer, batches, grad_accum, t, run_dir.tensorboard, rank,
                           resume.marker["samples_seen"] if resume else 0)

    log = RunLog(run_dir.path, rank == 0, t.max_steps, start_step, t.wandb_project,
                 OmegaConf.to_container(OmegaConf.structured(cfg)))
    log.info(f"model: {model.num_parameters():,} parameters, {cfg.model.n_layers} layers, norm={cfg.model.norm}, "
             f"attention={cfg.model.attention}, weights={cfg.model.weights}, surgery={cfg.model.surgery.site}; "
             f"{world_size} rank(s) x micro batch {t.micro_batch_size} x grad accum {grad_accum} = global batch "
             f"{batches.global_batch} x {t.seq_len} tokens, ZeRO-{t.zero_stage}, {precision}"
             + (f"; resumed from {resume.path}" if resume else ""))
    if not resume:
        log.write({"step": 0, "unigram_entropy": meta["unigram_entropy"], "parameters": model.num_parameters(),
                   "parameters_per_rank": held_per_rank, "global_batch": batches.global_batch}, "data")
    metrics = TrainMetrics(log, cfg, batches.global_batch * t.seq_len, grad_accum, world_size,
                           peak_tflops(torch.cuda.get_device_name(engine.device) if cuda else "", t.peak_tflops),
                           start_step)
    evaluation = Evaluation(engine, sources, t, world_size, rank, log, meta["unigram_entropy"])
    monitor = None
    if cfg.monitor.every:
        probe = ValBatches(sources, cfg.monitor.seq_len or t.seq_len, cfg.monitor.batch, 1, 0, f"first:{cfg.monitor.batch}")
        monitor = CollapseMonitor(engine, model, next(probe.batches(engine.device))[0], cfg.monitor, run_dir.path, log,
                                  start_step)
        if start_step == 0:
            monitor.record(0)
    return Run(rank, start_step, scheduler, checkpointer, batches, train_step, log, metrics, evaluation, monitor)


def device_precision(t):
    """(on CUDA?, the precision train.precision resolves to: auto is bf16 on CUDA, fp32 elsewhere)."""
    import torch
    from deepspeed.accelerator import get_accelerator

    cuda = get_accelerator().device_name() == "cuda"
    if not cuda:
        # Once layers collapse, vanishing gradients and AdamW's decaying second moments reach subnormal
        # floats, which a CPU computes an order of magnitude slower (a collapsed 192-layer run fell from
        # 750 to 47 tokens/s); flushed to zero they cost nothing and change nothing above 1e-38.
        torch.set_flush_denormal(True)
    return cuda, ("bf16" if cuda else "fp32") if t.precision == "auto" else t.precision


def prepare_run_dir(cfg, meta, resume, rank):
    """Rank 0 moves an earlier run aside when asked (train.overwrite) and writes this run's config with
    its provenance; every rank waits for it."""
    import torch.distributed as dist

    run_dir = RunDir(cfg.train.out_dir)
    if rank == 0:
        if not resume and cfg.train.overwrite and run_dir.describe_run():
            print(f"train.overwrite=true: moved the earlier run to {run_dir.move_aside()}", file=sys.stderr)
        run_dir.path.mkdir(parents=True, exist_ok=True)
        write_atomically(run_dir.config, to_yaml(cfg, provenance(data_fingerprint(meta))))
    dist.barrier()
    return run_dir


def train(cfg, data_path, meta, grad_accum, resume, stop_signal):
    """The loop: step, log, evaluate, then roll back, save or stop as the step policy decides."""
    import torch.distributed as dist

    from launch.step_policy import StepPolicy

    run = build_run(cfg, data_path, meta, grad_accum, resume)
    log, monitor, train_step = run.log, run.monitor, run.train_step
    policy = StepPolicy(cfg.train, stop_signal)
    stop_signal.release()
    exit_code, step = 0, run.start_step
    while step < cfg.train.max_steps:
        step_start, done = time.perf_counter(), step + 1
        monitoring = monitor is not None and monitor.due(done)
        result = train_step(done, run.metrics.due(done), monitor.before_step if monitoring else None)
        if result.skipped:
            in_a_row, in_all = policy.skipped_step()
            log.write({"step": done, "skipped": True, "nonfinite": result.nonfinite, "bad_steps": in_all}, "guard")
            log.info(f"step {done}: non-finite loss or gradient, first in {result.nonfinite}; step skipped "
                     f"({in_a_row} in a row, {in_all} in all)")
        for line in train_step.epochs_begun():
            log.info(line)
        if monitoring:
            monitor.record(done)
        if run.metrics.due(done):
            run.metrics.write(done, result, run.scheduler.get_last_lr()[0], train_step.samples_seen,
                              run.batches.mix_record(train_step.samples_seen), monitor.deepest_cos if monitor else None)
        run.evaluation.after_step(done)

        decision = policy.after_step(done, result.loss_sum, grad_accum, result.skipped, time.perf_counter() - step_start)
        point = run.checkpointer.newest() if decision.roll_back else None
        if point:
            step = roll_back(point, done, train_step.samples_seen, run.checkpointer, log, monitor)
            continue
        if decision.roll_back:
            log.info(f"step {done}: loss spike, but no checkpoint to roll back to yet; continuing")
        if decision.save:
            save_start = time.monotonic()
            run.checkpointer.save(done, train_step.samples_seen)
            policy.saved(save_start)
        if decision.stop:
            exit_code = stopped(decision, done, policy.bad_in_a_row, result.nonfinite, run.rank, log)
            break
        step += 1
    log.close()
    dist.barrier()
    return exit_code


def stopped(decision, done, bad_in_a_row, nonfinite, rank, log):
    """Say why the run stopped after saving step `done`; returns the exit code: DIVERGED, REQUEUE (the
    same command continues it; rank 0 asks the cluster to requeue the job), or 0."""
    from launch.nonfinite import DIVERGED
    from launch.preemption import REQUEUE, request_requeue

    if decision.stop == "diverged":
        log.info(f"stopped: {bad_in_a_row} non-finite steps in a row (train.max_bad_steps), first in {nonfinite}; "
                 f"the checkpoint of step {done} holds the last good weights")
        return DIVERGED
    log.info(f"saved step {done} and stopped for {decision.stop}; the same command resumes")
    if not decision.requeue:
        return 0
    if rank == 0:
        request_requeue()
    return REQUEUE


def roll_back(point, done, samples_seen, checkpointer, log, monitor):
    """Back to the checkpoint `point`'s weights, optimizer, schedule and RNG; the data goes on, so the
    batches since that checkpoint (the spike's among them) are skipped. Returns the step it is back at."""
    checkpointer.load(point)
    log.rewind(point.step)
    if monitor:
        monitor.rewind(point.step)
    skipped = samples_seen - point.marker["samples_seen"]
    log.write({"step": point.step, "rollback_from": done, "skipped_samples": skipped}, "rollback")
    log.info(f"step {done}: loss spike; rolled back to step {point.step}, skipping {skipped} samples")
    return point.step


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
    rank, world_size, local_rank = fill_launcher_env()
    grad_accum = exit_on_error(grad_accum_steps, cfg.train, world_size)
    resume = exit_on_error(find_resume_point, cfg, meta["tokenizer"]["hash"], data_fingerprint(meta))
    if not resume:
        exit_on_error(check_fresh_start, cfg)
    exit_on_error(check_extension_build_locks)
    # last of the checks: it imports torch, which the ones above answer bad input without
    memory_warning = exit_on_error(check_gpu_memory, cfg, world_size, local_rank)
    if memory_warning and rank == 0:
        print(memory_warning, file=sys.stderr)
    code = train(cfg, data_path, meta, grad_accum, resume, stop_signal)
    if code:
        # Every rank stops with this code at once, past train()'s last barrier. srun --kill-on-bad-exit
        # terminates the other ranks as soon as one exits non-zero, and Python restores SIGTERM's default
        # action while it shuts down: a rank still shutting down would die with 143 and hide the code.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    main()
