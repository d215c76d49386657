"""What a run does after each optimizer step: go on, save, roll back, or stop.

The policy owns what those decisions count: non-finite steps in a row and in all (the guard,
launch/nonfinite.py), the recent losses of the loss-spike check, when the last save was and how
long it took, and the stop signal and time limit (launch/preemption.py). Every rank asks it after
every step and gets the same answer: the flags are agreed over the ranks in one all-reduce, on the
host (launch.distributed.host_group), so that asking does not wait for the GPU.
"""

import collections
import time
from dataclasses import dataclass

from launch.distributed import host_group
from launch.preemption import StopSignal


@dataclass
class Decision:
    roll_back: bool  # a loss spike: back to the newest checkpoint (the trainer knows whether there is one)
    save: bool
    stop: str | None  # why the run stops after saving: "a signal", "the time limit", "train.stop_at_step",
    #                   or "diverged" (train.max_bad_steps non-finite steps in a row)

    @property
    def requeue(self):
        """Stopped early by the cluster, not by the run itself: the same command continues it."""
        return self.stop in ("a signal", "the time limit")


class StepPolicy:
    def __init__(self, t, stop_signal: StopSignal):
        """stop_signal: made when the process starts, so that a signal during start-up (imports, a
        checkpoint load that can take minutes) is kept for the first step, not fatal."""
        self.t, self.group = t, host_group()
        self.stop_signal = stop_signal
        self.bad_in_a_row = self.bad_total = 0
        self.recent_losses = collections.deque(maxlen=t.spike_window)
        self.last_save, self.save_seconds = time.monotonic(), 0.0

    def skipped_step(self):
        """Count a step the guard skipped; returns (in a row, in all)."""
        self.bad_in_a_row, self.bad_total = self.bad_in_a_row + 1, self.bad_total + 1
        return self.bad_in_a_row, self.bad_total

    def after_step(self, done, loss_sum, grad_accum, skipped, step_seconds):
        t = self.t
        if not skipped:
            self.bad_in_a_row = 0
        spiked = False
        if t.spike_factor and not skipped:
            local_loss = loss_sum.item() / grad_accum
            full = len(self.recent_losses) == self.recent_losses.maxlen
            spiked = full and local_loss > t.spike_factor * sum(self.recent_losses) / len(self.recent_losses)
            if not spiked:
                self.recent_losses.append(local_loss)
        signalled, out_of_time, save_due, spiked = agreed_flags([
            self.stop_signal.signal is not None,
            self.stop_signal.out_of_time(step_seconds, self.save_seconds),
            t.save_every_minutes and time.monotonic() - self.last_save >= 60 * t.save_every_minutes,
            spiked,
        ], self.group)
        diverged = self.bad_in_a_row >= t.max_bad_steps
        stop = ("diverged" if diverged else "a signal" if signalled else "the time limit" if out_of_time
                else "train.stop_at_step" if done == t.stop_at_step else None)
        save = bool(stop or save_due or done == t.max_steps or (t.save_every and done % t.save_every == 0))
        return Decision(roll_back=spiked, save=save, stop=stop)

    def saved(self, started):
        """A save that began at time.monotonic() `started` has ended."""
        self.last_save = time.monotonic()
        self.save_seconds = self.last_save - started


def agreed_flags(flags, group):
    """The max of each flag over the ranks of `group` (a host group, or None alone), so every rank
    takes the same save/stop decision."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(f) for f in flags])
    if group is not None:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return [bool(v) for v in t.tolist()]
