"""Training-step time, TFLOP/s and MFU of every method preset, as ratios to vanilla post-norm, in one run.

    python bench/step_time.py [--n-layers 32] [--d-model 64] [--seq-len 128] [--batch 16] [--repeats 7] [--compile]
    python bench/step_time.py --gpu      # the GPU table: 32 layers, d_model 1024, seq 2048, bf16

One step = forward, cross-entropy, backward and an AdamW update. The presets are timed in
interleaved rounds (vanilla, pre, ..., vanilla, pre, ...) so that drifts of the machine hit
all of them alike; the table shows each preset's median over the rounds and its ratio. With
--compile each preset is also timed with its blocks compiled (as train.compile=true does).
TFLOP/s counts model FLOPs (model/flops.py); MFU divides by the GPU's dense bf16 peak.
Every variant stays resident for the interleaving, so --gpu's depth is what 14 copies (7 presets,
eager and compiled) of the model and their AdamW states fit in 80 GB; the step-time ratios between
presets do not depend on depth, since every layer is the same.
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
from model.flops import flops_per_token, peak_tflops  # noqa: E402

PRESETS = ["vanilla", "pre", "deepnorm", "surgery", "spectral", "gapfree", "shaped"]


def preset_config(preset, args):
    return load_config([f"configs/methods/{preset}.yaml"], [
        f"model.n_layers={args.n_layers}", f"model.d_model={args.d_model}", f"model.n_heads={args.n_heads}",
        f"model.max_seq_len={args.seq_len}", f"train.seq_len={args.seq_len}", f"model.vocab_size={args.vocab}"])


def make_step(preset, args, device, dtype, compiled=False):
    torch.manual_seed(0)
    model = Transformer(preset_config(preset, args).model).to(device=device, dtype=dtype)
    if compiled:
        for block in model.blocks:
            block.compile()
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
    ap.add_argument("--compile", action="store_true", help="also time each preset with its blocks compiled")
    ap.add_argument("--gpu", action="store_true", help="the GPU benchmark's shape: 32 layers, d_model 1024, 16 heads, "
                                                       "seq 2048, batch 4, bf16, vocab 50304")
    args = ap.parse_args()
    if args.gpu:
        args.n_layers, args.d_model, args.n_heads, args.seq_len, args.batch = 32, 1024, 16, 2048, 4
        args.dtype, args.vocab = "bfloat16", 50304
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    presets = args.presets.split(",")
    variants = [(p, c) for p in presets for c in ((False, True) if args.compile else (False,))]
    steps = {v: make_step(*v[:1], args, device, dtype, compiled=v[1]) for v in variants}
    for v in variants:
        for _ in range(args.warmup):
            steps[v]()
    times = {v: [] for v in variants}
    for _ in range(args.repeats):
        for v in variants:
            times[v].append(timed(steps[v], device))
    median = {v: statistics.median(t) for v, t in times.items()}
    base = median[presets[0], False]
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    peak = peak_tflops(name) if device.type == "cuda" else None
    tokens = args.batch * args.seq_len
    print(f"{name}; torch {torch.__version__}; {args.n_layers} layers, d_model {args.d_model}, "
          f"batch {args.batch} x {args.seq_len}, {args.dtype}, median of {args.repeats}")
    print(f"| preset | step time (ms) | ratio to {presets[0]} | compiled / eager | TFLOP/s | MFU |")
    print("|---|---|---|---|---|---|")
    for (p, compiled), seconds in median.items():
        tflops = flops_per_token(preset_config(p, args).model, args.seq_len, tokens) * tokens / seconds / 1e12
        label = f"{p} (compiled)" if compiled else p
        vs_eager = f"{seconds / median[p, False]:.3f}" if compiled else "–"
        mfu = f"{tflops / peak:.3f}" if peak else "–"
        print(f"| {label} | {1000 * seconds:.1f} | {seconds / base:.3f} | {vs_eager} | {tflops:.3g} | {mfu} |")


if __name__ == "__main__":
    main()
