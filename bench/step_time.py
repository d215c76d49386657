"""Training-step time of every method preset as a ratio to vanilla post-norm, measured in one run.

    python bench/step_time.py [--n-layers 32] [--d-model 64] [--seq-len 128] [--batch 16] [--repeats 7]

One step = forward, cross-entropy, backward and an AdamW update. The presets are timed in
interleaved rounds (vanilla, pre, ..., vanilla, pre, ...) so that drifts of the machine hit
all of them alike; the table shows each preset's median over the rounds and its ratio.
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

PRESETS = ["vanilla", "pre", "deepnorm", "surgery", "spectral", "gapfree", "shaped"]


def make_step(preset, args, device, dtype):
    cfg = load_config([f"configs/methods/{preset}.yaml"], [
        f"model.n_layers={args.n_layers}", f"model.d_model={args.d_model}", f"model.n_heads={args.n_heads}",
        f"model.max_seq_len={args.seq_len}", f"train.seq_len={args.seq_len}", f"model.vocab_size={args.vocab}"])
    torch.manual_seed(0)
    model = Transformer(cfg.model).to(device=device, dtype=dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    idx = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), device=device)

    def step():
        logits = model(idx[:, :-1])
        F.cross_entropy(logits.float().flatten(0, 1), idx[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def timed(step, device):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    step()
    sync()
    return time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-layers", type=int, default=32)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--n-heads", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--presets", default=",".join(PRESETS))
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    presets = args.presets.split(",")
    steps = {p: make_step(p, args, device, dtype) for p in presets}
    for p in presets:
        for _ in range(args.warmup):
            steps[p]()
    times = {p: [] for p in presets}
    for _ in range(args.repeats):
        for p in presets:
            times[p].append(timed(steps[p], device))
    base = statistics.median(times[presets[0]])
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{name}; torch {torch.__version__}; {args.n_layers} layers, d_model {args.d_model}, "
          f"batch {args.batch} x {args.seq_len}, {args.dtype}, median of {args.repeats}")
    print(f"| preset | step time (ms) | ratio to {presets[0]} |")
    print("|---|---|---|")
    for p in presets:
        median = statistics.median(times[p])
        print(f"| {p} | {1000 * median:.1f} | {median / base:.3f} |")


if __name__ == "__main__":
    main()
