"""Cost of the collapse monitors: time and memory of one monitor step against one training step.

    python bench/monitor_overhead.py [--every 100] [--steps 30] [--monitor-steps 5] [--sgd] [--json F] [key=value ...]

    # the deep case: 1,000 layers x d_model 256, T 256 (SGD: AdamW's state would not fit beside it on 24 GB)
    python bench/monitor_overhead.py --steps 4 --monitor-steps 2 --sgd model.n_layers=1000 model.d_model=256 \\
        model.n_heads=4 train.seq_len=256 model.max_seq_len=256 train.micro_batch_size=1

Times training steps (forward, loss, backward, optimizer) of the configured model without monitors
and, in the same process, monitored steps: the gradient norms and the pre-step copy around the
optimizer step plus the probe forward and every metric. On a GPU (bf16 there) memory is torch's
peak allocation; on the CPU the C heap's allocated bytes, sampled every millisecond by a thread.
Reported: what the monitor holds across the optimizer step (its pre-step copies) and the probe's
peak above the memory just before it, next to the peak of a whole training step above its start,
so together they say whether monitoring can raise a run's peak. Ratio at cadence k = (k·step + monitor) / (k·step).
"""

import argparse
import ctypes
import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from configs import load_config  # noqa: E402
from model import Transformer  # noqa: E402
from monitors.collapse import CollapseMonitor  # noqa: E402


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


class Quiet:
    """A log that keeps nothing: the bench times computing, not writing."""

    enabled = False


class DevicePeak:
    """The highest memory torch allocated on the GPU since the last reset."""

    def now(self):
        return torch.cuda.memory_allocated()

    def reset(self):
        torch.cuda.reset_peak_memory_stats()
        return self.now()

    @property
    def peak(self):
        return torch.cuda.max_memory_allocated()


class HeapPeak:
    """The most memory the C heap held allocated (glibc's mallinfo2: in-use heap blocks plus mmapped
    ones, where torch's CPU tensors live) since the last reset, sampled every millisecond by a daemon
    thread. Not the resident size: glibc keeps freed memory resident, so that would not fall after a
    step."""

    def __init__(self):
        self.mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
        self.mallinfo2.restype = MallInfo2
        self.peak = 0
        threading.Thread(target=self._sample, daemon=True).start()

    def now(self):
        info = self.mallinfo2()
        return info.uordblks + info.hblkhd

    def _sample(self):
        while True:
            self.peak = max(self.peak, self.now())
            time.sleep(0.001)

    def reset(self):
        self.peak = self.now()
        return self.peak


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--every", type=int, default=None, help="cadence (default: monitor.every of the config)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--monitor-steps", type=int, default=5)
    ap.add_argument("--sgd", action="store_true", help="plain SGD instead of AdamW (no optimizer state)")
    ap.add_argument("--json", help="also write the results to this JSON file")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config(["configs/default.yaml"], args.overrides)
    every = args.every or cfg.monitor.every
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.manual_seed(0)
    model = Transformer(cfg.model).to(device=device, dtype=dtype)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4) if args.sgd else torch.optim.AdamW(model.parameters(), lr=1e-4)
    V, T = cfg.model.vocab_size, cfg.train.seq_len
    idx = torch.randint(0, V, (cfg.train.micro_batch_size, T + 1), device=device)
    probe = torch.randint(0, V, (cfg.monitor.batch, cfg.monitor.seq_len or T), device=device)
    monitor = CollapseMonitor(model, model, probe, cfg.monitor, "/nonexistent", Quiet())
    memory = DevicePeak() if cuda else HeapPeak()
    layer_bytes = sum(p.numel() * p.element_size() for p in model.blocks[0].parameters())

    def step(monitored):
        """(seconds, peak above the step's start, the monitor's copies held across the optimizer step,
        the probe's peak above the memory before it)"""
        sync()
        start, base = time.perf_counter(), memory.reset()
        F.cross_entropy(model(idx[:, :-1]).float().flatten(0, 1), idx[:, 1:].flatten()).backward()
        step_peak, held, probe_peak = memory.peak, 0, 0
        if monitored:
            before = memory.now()
            monitor.before_step()
            held = memory.now() - before
        opt.step()
        opt.zero_grad(set_to_none=True)
        if monitored:
            probe_base = memory.reset()
            monitor.record(0)
            time.sleep(0.005)  # one more sample
            probe_peak = memory.peak - probe_base
        sync()
        return time.perf_counter() - start, max(step_peak, memory.peak) - base, held, probe_peak

    for monitored in (False, False, True):  # warm-up: first calls of every shape, untimed
        step(monitored)
    plain, monitored = [], []
    for i in range(args.steps):
        plain.append(step(False))
        if i % max(1, args.steps // args.monitor_steps) == 0:
            monitored.append(step(True))
    step_s = statistics.median(s[0] for s in plain)
    monitor_s = statistics.median(s[0] for s in monitored) - step_s
    step_peak = max(s[1] for s in plain)
    held, probe_peak = max(s[2] for s in monitored), max(s[3] for s in monitored)
    name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    header = (f"{name}; torch {torch.__version__}; {cfg.model.n_layers} layers, d_model {cfg.model.d_model}, batch "
              f"{cfg.train.micro_batch_size} x {T}, {str(dtype).removeprefix('torch.')}, {'SGD' if args.sgd else 'AdamW'}; "
              f"probe {cfg.monitor.batch} x {probe.shape[1]}; monitor.update_layers {cfg.monitor.update_layers}")
    result = {"device": name, "header": header, "step_s": step_s, "monitor_s": monitor_s, "every": every,
              "ratio": (every * step_s + monitor_s) / (every * step_s), "step_peak_bytes": step_peak,
              "held_bytes": held, "probe_peak_bytes": probe_peak, "layer_bytes": layer_bytes}
    if args.json:
        Path(args.json).write_text(json.dumps(result))
    mb = lambda b: f"{b / 2**20:.1f} MB"  # noqa: E731
    print(header)
    print("| quantity | value |")
    print("|---|---|")
    print(f"| training step (median of {len(plain)}) | {1000 * step_s:.1f} ms |")
    print(f"| one monitor step, extra (median of {len(monitored)}) | {1000 * monitor_s:.1f} ms "
          f"({monitor_s / step_s:.2f} steps) |")
    print(f"| time ratio with monitors every {every} steps vs off | {result['ratio']:.4f} |")
    print(f"| a training step's peak memory above its start | {mb(step_peak)} |")
    print(f"| the monitor's copies held across the optimizer step | {mb(held)} ({held / layer_bytes:.2f} layers' "
          "parameters) |")
    print(f"| the probe's peak memory above the memory before it | {mb(probe_peak)} "
          f"({probe_peak / layer_bytes:.2f} layers' parameters) |")

if __name__ == "__main__":
    main()
