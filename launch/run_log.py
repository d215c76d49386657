"""metrics.jsonl, TensorBoard and the progress bar of a run; every write happens on rank 0 only.

A resumed run continues the same files: metrics.jsonl loses the lines logged after the checkpoint
it resumes from (they will be logged again), and TensorBoard purges those steps, so no step
appears twice.
"""

import json
import sys

from launch.run_dir import RunDir, read_jsonl, rewrite_jsonl


class RunLog:
    def __init__(self, out_dir, enabled, total_steps, start_step=0):
        self.enabled = enabled
        if not enabled:
            return
        from tqdm import tqdm

        self.run_dir = RunDir(out_dir)
        self._open(start_step, fresh=not start_step)
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True, mininterval=1.0)

    def _open(self, start_step, fresh):
        from torch.utils.tensorboard import SummaryWriter

        metrics = self.run_dir.metrics
        if not fresh:  # the lines after the checkpoint will be logged again
            rewrite_jsonl(metrics, read_jsonl(metrics, start_step))
        self.metrics = open(metrics, "w" if fresh else "a")
        self.tb = SummaryWriter(str(self.run_dir.tensorboard), purge_step=None if fresh else start_step + 1)

    def rewind(self, step):
        """Continue the logs from `step` again (after a rollback to its checkpoint)."""
        if self.enabled:
            self.metrics.close()
            self.tb.close()
            self._open(step, fresh=False)

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
