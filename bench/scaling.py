"""Step time and peak memory vs depth and vs sequence length, with and without activation checkpointing.

    python bench/scaling.py [--depths 12,48,192,1000] [--seq-lens 64,128,256,512] [--batch 4]

Each point runs in a fresh process (peak RSS only grows within one), timing the median of a few
training steps (forward, loss, backward, AdamW) of the default model's width. On CUDA the peak is
torch.cuda.max_memory_allocated. Time and memory should grow linearly in depth.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def measure(depth, seq_len, batch, checkpointing, steps):
    """Runs in the child process: one point, printed as JSON."""
    sys.path.insert(0, str(ROOT))
    import resource

    import torch
    import torch.nn.functional as F

    from configs import load_config
    from launch.train_step import checkpoint_activations
    from model import Transformer

    cfg = load_config([ROOT / "configs/default.yaml"], [f"model.n_layers={depth}", f"model.max_seq_len={seq_len}",
                                                         f"train.seq_len={seq_len}"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = Transformer(cfg.model).to(device)
    checkpoint_activations(model.blocks, checkpointing)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    idx = torch.randint(0, cfg.model.vocab_size, (batch, seq_len + 1), device=device)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"step_ms": 1000 * statistics.median(times[1:]), "peak_mb": peak}))


def point(depth, seq_len, batch, checkpointing, steps):
    out = subprocess.run([sys.executable, __file__, "--point", str(depth), str(seq_len), str(batch), str(checkpointing),
                          str(steps)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depths", default="12,48,192,1000")
    ap.add_argument("--seq-lens", default="64,128,256,512")
    ap.add_argument("--depth-for-seq", type=int, default=48)
    ap.add_argument("--seq-for-depth", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--point", nargs=5, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.point:
        measure(*args.point)
        return
    print(f"batch {args.batch}, d_model 64 (configs/default.yaml), median of {args.steps} steps, one process per point")
    print("| depth | seq len | step (ms) | step, ckpt (ms) | ms per layer | peak MB | peak MB, ckpt |")
    print("|---|---|---|---|---|---|---|")
    sweep = [(int(d), args.seq_for_depth) for d in args.depths.split(",")]
    sweep += [(args.depth_for_seq, int(s)) for s in args.seq_lens.split(",") if (args.depth_for_seq, int(s)) not in sweep]
    for depth, seq in sweep:
        plain, ckpt = (point(depth, seq, args.batch, k, args.steps) for k in (0, 1))
        print(f"| {depth} | {seq} | {plain['step_ms']:.0f} | {ckpt['step_ms']:.0f} | {plain['step_ms'] / depth:.1f} | "
              f"{plain['peak_mb']:.0f} | {ckpt['peak_mb']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
