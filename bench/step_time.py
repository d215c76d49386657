"""Training-step time, TFLOP/s and MFU of every method preset, as ratios to vanilla post-norm, in one run.

    python bench/step_time.py [--n-layers 32] [--d-model 64] [--seq-len 128] [--batch 16] [--repeats 7] [--compile]
    python bench/step_time.py --gpu      # the GPU table: 32 layers, d_model 1024, seq 2048, bf16
    python bench/step_time.py --json F   # also the results as JSON (bench/gpu.py reads them)
    python bench/step_time.py --forward-backward   # without the optimizer step
    python bench/step_time.py --against REV         # also the model code of git revision REV, interleaved

One step = forward, cross-entropy, backward and an AdamW update. The presets are timed in
interleaved rounds (vanilla, pre, ..., vanilla, pre, ...) so that drifts of the machine hit
all of them alike; the table shows each preset's median over the rounds and its ratio. With
--compile each preset is also timed with its blocks compiled (as train.compile=true does), and a
compiled row's ratio is to compiled vanilla.
TFLOP/s counts model FLOPs (model/flops.py); MFU divides by the GPU's dense bf16 peak. A variant
that fails to build or compile (shaped attention under some inductor versions) gets its error in
its row; the others are still timed.
With --against, every preset is also built from the model code of another git revision of this
repository and timed in the same interleaved rounds: whether a change made any preset slower is then
read from one run, not from two runs on a machine whose noise is as large as the change.
Every variant stays resident for the interleaving, so --gpu's depth is what 14 copies (7 presets,
eager and compiled) of the model and their AdamW states fit in 80 GB; the step-time ratios between
presets do not depend on depth, since every layer is the same.
"""

import argparse
import importlib
import io
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from configs import load_config  # noqa: E402
from model import Transformer  # noqa: E402
from model.flops import flops_per_token, peak_tflops  # noqa: E402

PRESETS = ["vanilla", "pre", "deepnorm", "surgery", "spectral", "gapfree", "shaped"]


def preset_config(preset, args, root=ROOT, load=load_config):
    return load([f"{root}/configs/methods/{preset}.yaml"], [
        f"model.n_layers={args.n_layers}", f"model.d_model={args.d_model}", f"model.n_heads={args.n_heads}",
        f"model.max_seq_len={args.seq_len}", f"train.seq_len={args.seq_len}", f"model.vocab_size={args.vocab}"])


def revision_code(rev, into):
    """(load_config, Transformer) of git revision `rev` of this repository: its files are extracted
    into the folder `into` and its `configs` and `model` imported under their own names, then set
    aside so that this checkout's stay what the rest of the script uses."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "configs", "model"], capture_output=True)
    if archive.returncode:
        sys.exit(f"error: --against {rev}: {archive.stderr.decode().strip()}")
    tarfile.open(fileobj=io.BytesIO(archive.stdout)).extractall(into, filter="data")
    ours = {name: module for name, module in sys.modules.items() if name.split(".")[0] in ("configs", "model")}
    for name in ours:
        del sys.modules[name]
    sys.path.insert(0, str(into))
    try:
        code = importlib.import_module("configs").load_config, importlib.import_module("model").Transformer
    finally:
        sys.path.remove(str(into))
        for name in [n for n in sys.modules if n.split(".")[0] in ("configs", "model")]:
            del sys.modules[name]
        sys.modules.update(ours)
    return code


def make_step(preset, args, device, dtype, compiled=False, code=None):
    """One training step of `preset`, built by this checkout's code or by `code` = (root, load_config, Transformer)."""
    root, load, transformer = code or (ROOT, load_config, Transformer)
    torch.manual_seed(0)
    model = transformer(preset_config(preset, args, root, load).model).to(device=device, dtype=dtype)
    if compiled:
        for block in model.blocks:
            block.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    idx = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), device=device)

    def step():
        logits = model(idx[:, :-1])
        F.cross_entropy(logits.float().flatten(0, 1), idx[:, 1:].flatten()).backward()
        if not args.forward_backward:
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
    ap.add_argument("--json", help="also write the results to this JSON file")
    ap.add_argument("--forward-backward", action="store_true", help="time forward and backward only, no optimizer step "
                                                                     "(where the methods' own work is)")
    ap.add_argument("--against", metavar="REV", help="also time every preset as git revision REV builds it, "
                                                       "in the same rounds, and print this checkout's time over REV's")
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
    codes = {None: None}
    if args.against:
        into = tempfile.TemporaryDirectory(prefix="step_time_")  # removed when main returns
        codes[args.against] = (into.name, *revision_code(args.against, into.name))
    steps, failed = {}, {}
    for v in [(*v, rev) for rev in codes for v in variants]:
        try:  # a variant that does not build or compile is reported, not fatal: the others are still timed
            steps[v] = make_step(v[0], args, device, dtype, compiled=v[1], code=codes[v[2]])
            for _ in range(args.warmup):
                steps[v]()
        except Exception as e:  # noqa: BLE001
            if v[2] is None:  # REV's own failure leaves only its columns empty
                failed[v[:2]] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
            steps.pop(v, None)
    times = {v: [] for v in steps}
    for _ in range(args.repeats):
        for v in steps:
            times[v].append(timed(steps[v], device))
    median = {v: statistics.median(t) for v, t in times.items()}
    theirs = {v[:2]: t for v, t in median.items() if v[2] is not None}
    median = {v[:2]: t for v, t in median.items() if v[2] is None}
    base = median[presets[0], False]
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    peak = peak_tflops(name) if device.type == "cuda" else None
    tokens = args.batch * args.seq_len
    rows = []
    for (p, compiled) in variants:
        row = {"preset": p, "compiled": compiled}
        if (p, compiled) in failed:
            rows.append({**row, "failed": failed[p, compiled]})
            continue
        seconds = median[p, compiled]
        tflops = flops_per_token(preset_config(p, args).model, args.seq_len, tokens) * tokens / seconds / 1e12
        rows.append({**row, "ms": 1000 * seconds, "ratio": seconds / median.get((presets[0], compiled), base), "tflops": tflops,
                     "mfu": tflops / peak if peak else None,
                     "vs_eager": seconds / median[p, False] if compiled and (p, False) in median else None})
        if (p, compiled) in theirs and (presets[0], compiled) in theirs:
            rows[-1].update(against_ratio=theirs[p, compiled] / theirs[presets[0], compiled],
                            vs_against=seconds / theirs[p, compiled])
    memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    header = (f"{name}; torch {torch.__version__}; {args.n_layers} layers, d_model {args.d_model}, "
              f"batch {args.batch} x {args.seq_len}, {args.dtype}, median of {args.repeats}"
              + ("; forward + backward only" if args.forward_backward else "")
              + (f"; against {args.against}, in the same rounds" if args.against else ""))
    against = [f"{args.against}: ratio to its {presets[0]}", f"this / {args.against}"] if args.against else []
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "header": header, "rows": rows, "peak_memory_gib": memory}))
    print(header)
    columns = ["preset", "step time (ms)", f"ratio to {presets[0]} (compiled: to compiled {presets[0]})",
               "compiled / eager", "TFLOP/s", "MFU", *against]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for r in rows:
        label = f"{r['preset']} (compiled)" if r["compiled"] else r["preset"]
        if "failed" in r:
            print(f"| {label} | failed: {r['failed']} |" + " |" * (len(columns) - 2))
            continue
        vs_eager = f"{r['vs_eager']:.3f}" if r["vs_eager"] else "–"
        mfu = f"{r['mfu']:.3f}" if r["mfu"] else "–"
        theirs = [f"{r['against_ratio']:.3f}", f"{r['vs_against']:.3f}"] if "vs_against" in r else ["–"] * len(against)
        print(" | ".join([f"| {label}", f"{r['ms']:.1f}", f"{r['ratio']:.3f}", vs_eager, f"{r['tflops']:.3g}", mfu, *theirs]) + " |")

if __name__ == "__main__":
    main()
