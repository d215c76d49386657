"""The training step: one optimizer step over grad_accum micro-batches at the run's place in the data,
with what happens around it (fault injection, the profiler, the monitors' gradient read) and the
diagnosis of a step the non-finite guard skipped (launch/nonfinite.py)."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from launch.nonfinite import FaultInjection, agreed_min_layer, describe, first_nonfinite_layer
from launch.profiling import StepProfiler


@dataclass
class StepResult:
    loss_sum: torch.Tensor  # this rank's loss summed over its micro-batches, on the device (no host read)
    grad_norm: float | None  # the global gradient norm before clipping, when asked for
    skipped: bool  # the engine's own word, whoever checked the step (launch/nonfinite.py)
    nonfinite: str | None  # where a skipped step's non-finite values first appeared


class TrainStep:
    """Owns the place in the data (samples_seen): the data moves on after every step, a skipped or
    rolled-back one included, so a bad batch is never seen twice."""

    def __init__(self, engine, model, optimizer, batches, grad_accum, t, profile_dir, rank, samples_seen):
        self.engine, self.model, self.optimizer, self.batches = engine, model, optimizer, batches
        self.grad_accum, self.samples_seen = grad_accum, samples_seen
        self.injections = [FaultInjection(spec, model, factor) for spec, factor in
                           ((t.inject_nonfinite, float("nan")), (t.inject_spike, 100.0)) if spec]
        self.profiler = StepProfiler(t.profile_steps, profile_dir, rank)

    def __call__(self, done, want_grad_norm, before_step=None):
        """Optimizer step number `done`. before_step, if given, runs after the last backward, before the
        optimizer step (the monitors' update ratio)."""
        for injection in self.injections:
            injection.begin_step(done)
        self.profiler.begin(done)
        engine, first = self.engine, self.samples_seen
        loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)
        grad_norm = None
        for micro in range(self.grad_accum):
            x, y = self.batches.micro_batch_at(first, micro, engine.device)
            loss = F.cross_entropy(engine(x).float().flatten(0, 1), y.flatten())
            engine.backward(loss)
            loss_sum += loss.detach().double()
            if micro == self.grad_accum - 1:
                if want_grad_norm:
                    grad_norm = self.unclipped_norm()
                if before_step:
                    before_step()
            engine.step()
        if want_grad_norm and grad_norm is None:
            grad_norm = engine.get_global_grad_norm()
        self.profiler.end(done)
        skipped = not engine.was_step_applied()
        self.samples_seen += self.batches.global_batch
        return StepResult(loss_sum, None if grad_norm is None else float(grad_norm), skipped,
                          self.locate_nonfinite(first) if skipped else None)

    def unclipped_norm(self):
        """The global gradient norm before clipping, or None where DeepSpeed records it itself.

        DeepSpeed's optimizer wrappers (ZeRO, bf16, fp16) record the norm during step(); the bare
        fp32 optimizer of ZeRO-0 does not, and there the full, all-reduced grads sit on the module."""
        if hasattr(self.engine.optimizer, "_global_grad_norm"):
            return None
        return torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None]).item()

    def locate_nonfinite(self, first_sample):
        """Where the skipped step's non-finite values appeared: the first non-finite layer over the
        ranks on the step's first micro-batch, else the parameter whose gradient was non-finite."""
        x, _ = self.batches.micro_batch_at(first_sample, 0, self.engine.device)
        layer = agreed_min_layer(first_nonfinite_layer(self.model, self.engine, x), self.engine.device)
        return describe(self.model, layer, getattr(self.optimizer, "bad_params", []))

    def epochs_begun(self):
        """Lines announcing the epochs the last step began."""
        return self.batches.epochs_begun(self.samples_seen - self.batches.global_batch, self.samples_seen)


def checkpoint_activations(blocks, every):
    """train.activation_checkpointing=k: every k-th block keeps only its input in the forward pass and
    recomputes the rest in backward (0: off). Applied to the blocks in place, so parameter names,
    checkpoints and the model's code stay as they are."""
    from torch.distributed._composable import checkpoint

    for i, block in enumerate(blocks):
        if every and i % every == 0:
            checkpoint(block)
