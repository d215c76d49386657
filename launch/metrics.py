"""The train record of a logging step (every train.log_every steps and the last): the loss over all
ranks, lr, gradient norm, throughput and MFU since the previous logging step, peak memory. The only
host reads of the step path happen here, on logging steps."""

import resource
import time

import torch
import torch.distributed as dist

from model.flops import flops_per_token


def peak_memory_mb():
    """Peak memory of this rank: GPU memory allocated on CUDA, else the process's max RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class TrainMetrics:
    def __init__(self, log, cfg, tokens_per_step, grad_accum, world_size, peak_tflops, start_step):
        self.log, self.log_every, self.max_steps = log, cfg.train.log_every, cfg.train.max_steps
        self.tokens_per_step, self.grad_accum, self.world_size = tokens_per_step, grad_accum, world_size
        self.model_flops = flops_per_token(cfg.model, cfg.train.seq_len, cfg.train.micro_batch_size * cfg.train.seq_len)
        self.peak, self.start_step = peak_tflops, start_step
        self.tick = time.perf_counter()

    def due(self, done):
        return done % self.log_every == 0 or done == self.max_steps

    def write(self, done, result, lr, samples_seen, extra, deepest_cos=None):
        """result: the step's StepResult; extra: more fields of the record (the data mix)."""
        # a copy: the step's loss_sum stays this rank's own, which the spike check compares with its history
        global_loss = result.loss_sum.clone()
        dist.all_reduce(global_loss)
        loss = global_loss.item() / (self.grad_accum * self.world_size)
        elapsed, self.tick = time.perf_counter() - self.tick, time.perf_counter()
        steps_in_window = self.log_every if done % self.log_every == 0 else done % self.log_every
        tokens_per_s = self.tokens_per_step * min(steps_in_window, done - self.start_step) / elapsed
        tflops = self.model_flops * tokens_per_s / self.world_size / 1e12  # per rank, as the peak is per device
        self.log.write({"step": done, "loss": loss, "lr": lr, "grad_norm": result.grad_norm,
                        "tokens_per_s": tokens_per_s, "model_flops_per_token": self.model_flops,
                        "tflops_per_rank": tflops, **({"mfu": tflops / self.peak} if self.peak else {}),
                        "samples": samples_seen, **extra, "peak_memory_mb": peak_memory_mb()}, "train")
        self.log.progress(done, loss=loss, tok_s=tokens_per_s,
                          **({"deep_cos": deepest_cos} if deepest_cos is not None else {}))
