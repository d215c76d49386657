"""Cost of the collapse monitors: one monitor step, and the training-time ratio at a cadence.

    python bench/monitor_overhead.py [--every 100] [--steps 30] [key=value ...]

Times training steps (forward, loss, backward, AdamW) of the default model without monitors and,
in the same process, monitor steps (the gradient/parameter snapshot around the optimizer step plus
the probe forward and all metrics). Ratio at cadence k = (k·step + monitor) / (k·step).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from configs import load_config  # noqa: E402
from model import Transformer  # noqa: E402
from monitors.collapse import CollapseMonitor  # noqa: E402


class Quiet:
    """A log that keeps nothing: the bench times computing, not writing."""

    enabled = False


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--every", type=int, default=None, help="cadence (default: monitor.every of the config)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--monitor-steps", type=int, default=5)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config(["configs/default.yaml"], args.overrides)
    every = args.every or cfg.monitor.every
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    V, T = cfg.model.vocab_size, cfg.train.seq_len
    idx = torch.randint(0, V, (cfg.train.micro_batch_size, T + 1))
    monitor = CollapseMonitor(model, model, torch.randint(0, V, (cfg.monitor.batch, T)), cfg.monitor, "/nonexistent", Quiet())

    def step(monitored):
        F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten()).backward()
        if monitored:
            monitor.before_step()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if monitored:
            monitor.record(0)

    def timed(monitored):
        start = time.perf_counter()
        step(monitored)
        return time.perf_counter() - start

    for _ in range(3):
        step(False)
    plain, monitored = [], []
    for i in range(args.steps):
        plain.append(timed(False))
        if i % (args.steps // args.monitor_steps) == 0:
            monitored.append(timed(True))
    step_s = statistics.median(plain)
    monitor_s = statistics.median(monitored) - step_s
    print(f"CPU, {torch.get_num_threads()} threads; torch {torch.__version__}; {cfg.model.n_layers} layers, d_model "
          f"{cfg.model.d_model}, batch {cfg.train.micro_batch_size} x {T}; probe {cfg.monitor.batch} x {T}")
    print("| quantity | value |")
    print("|---|---|")
    print(f"| training step (median of {len(plain)}) | {1000 * step_s:.1f} ms |")
    print(f"| one monitor step, extra (median of {len(monitored)}) | {1000 * monitor_s:.1f} ms |")
    print(f"| time ratio with monitors every {every} steps vs off | {(every * step_s + monitor_s) / (every * step_s):.4f} |")


if __name__ == "__main__":
    main()
