"""Stop cleanly when the cluster says so: SIGTERM (preemption, scancel) and SIGUSR1 (SLURM's
warning before the time limit, `#SBATCH --signal=USR1@300`), or this invocation's own wall-time
budget. The run then saves at the next step boundary, exits with REQUEUE and, where the SLURM
scripts in launch/ set $FATHOM_REQUEUE_FILE, creates that file; the script answers with
`scontrol requeue`, and the requeued job resumes from the checkpoint. (The file, not the exit code,
is what the scripts read: torchrun turns any non-zero exit of its workers into 1.)
"""

import os
import signal
import time
from pathlib import Path

REQUEUE = 75  # EX_TEMPFAIL: "saved, start me again"
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def request_requeue():
    path = os.environ.get("FATHOM_REQUEUE_FILE")
    if path:
        Path(path).touch()


class StopSignal:
    def __init__(self, time_limit_minutes=0, started=None):
        """started: time.monotonic() when the invocation began: the budget also pays for start-up
        (imports, engine, checkpoint load), which on a big model can take minutes."""
        self.signal = None
        self.started = time.monotonic() if started is None else started
        self.budget = time_limit_minutes * 60
        self.slowest_step = 0.0
        for sig in SIGNALS:
            signal.signal(sig, self._handle)

    def hold(self):
        """Keep the signals pending through start-up. SLURM signals every process of a job step, and
        the processes start-up spawns (the ninja build of a DeepSpeed op, compile workers) would die
        of them: the run fails, and a build killed half-way leaves a lock that the next job waits on.
        A blocked signal stays blocked in those children, and reaches this process at `release`."""
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)

    def release(self):
        """Start-up is over: a signal that came during it is handled now, and stops the run after its
        first step."""
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def out_of_time(self, step_seconds, save_seconds):
        """True when another step plus a save might not fit in the wall-time budget."""
        if not self.budget:
            return False
        self.slowest_step = max(self.slowest_step, step_seconds)
        return time.monotonic() - self.started + 2 * self.slowest_step + 2 * save_seconds > self.budget
