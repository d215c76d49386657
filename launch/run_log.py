"""metrics.jsonl, TensorBoard, Weights & Biases and the progress display of a run; rank 0 only.

A resumed run continues the same files: metrics.jsonl loses the lines logged after the checkpoint
it resumes from (they will be logged again), and TensorBoard purges those steps, so no step
appears twice. With train.wandb_project set, every scalar and figure that goes to TensorBoard goes
to W&B too, into one W&B run per run directory (its id is kept there, so a restart resumes it).
On a terminal progress is a redrawn bar; in a log file (SLURM, nohup) one plain line per logged step.
"""

import json
import sys

from launch.run_dir import RunDir, read_jsonl, rewrite_jsonl


class Scalars:
    """TensorBoard's add_scalar / add_figure, copied to W&B when a project is set."""

    def __init__(self, tensorboard, wandb_run):
        self.tensorboard, self.wandb_run = tensorboard, wandb_run

    def add_scalar(self, tag, value, step):
        self.tensorboard.add_scalar(tag, value, step)
        if self.wandb_run:
            self.wandb_run.log({tag: value}, step=step)

    def add_figure(self, tag, figure, step):
        if self.wandb_run:
            import wandb

            self.wandb_run.log({tag: wandb.Image(figure)}, step=step)
        self.tensorboard.add_figure(tag, figure, step)  # closes the figure

    def close(self):
        self.tensorboard.close()


def start_wandb(run_dir, project, config):
    """The W&B run of this run directory: created once, resumed by every later start."""
    import wandb

    run_id = run_dir.wandb_id.read_text().strip() if run_dir.wandb_id.is_file() else None
    run = wandb.init(project=project, id=run_id, resume="allow" if run_id else None, dir=str(run_dir.path),
                     config=config, name=run_dir.path.name)
    run_dir.wandb_id.write_text(run.id + "\n")
    return run


class RunLog:
    def __init__(self, out_dir, enabled, total_steps, start_step=0, wandb_project="", config=None):
        self.enabled = enabled
        if not enabled:
            return
        self.run_dir = RunDir(out_dir)
        self.total_steps = total_steps
        self.wandb_run = start_wandb(self.run_dir, wandb_project, config) if wandb_project else None
        self._open(start_step, fresh=not start_step)
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True, mininterval=1.0)

    def _open(self, start_step, fresh):
        from torch.utils.tensorboard import SummaryWriter

        metrics = self.run_dir.metrics
        if not fresh:  # the lines after the checkpoint will be logged again
            rewrite_jsonl(metrics, read_jsonl(metrics, start_step))
        self.metrics = open(metrics, "w" if fresh else "a")
        tensorboard = SummaryWriter(str(self.run_dir.tensorboard), purge_step=None if fresh else start_step + 1)
        self.tb = Scalars(tensorboard, self.wandb_run)

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
        if not self.enabled:
            return
        values = {k: f"{v:.4g}" for k, v in postfix.items()}
        if self.bar:
            self.bar.n = step
            self.bar.set_postfix(values, refresh=True)
        else:  # a file: carriage returns of a redrawn bar would fill it
            print(f"step {step}/{self.total_steps} " + " ".join(f"{k}={v}" for k, v in values.items()),
                  file=sys.stderr, flush=True)

    def info(self, message):
        if not self.enabled:
            return
        if self.bar:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def close(self):
        if self.enabled:
            if self.bar:
                self.bar.close()
            self.tb.close()
            self.metrics.close()
            if self.wandb_run:
                self.wandb_run.finish()
