"""Host overhead of one training step: the ops the trainer launches besides the model's own.

    python bench/host_overhead.py [--layers 64] [--ranks 2] [key=value ...]

Trains through the real launcher (torchrun, 2 CPU ranks, bf16, ZeRO-1 by default) with
train.profile_steps on steps that are not logging, evaluation, monitor or save steps, and counts per
step in rank 0's torch.profiler trace: non-finite checks (`aten::isfinite`, `aten::isinf`,
`aten::isnan`), norm ops, and device-to-host reads (`aten::_local_scalar_dense`, what `.item()`,
`bool(tensor)` and `.tolist()` become). On a GPU each read is a stream synchronisation and each op
a kernel launch, so these counts, not CPU milliseconds, are what carries over to 1,000 layers.
"""

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from launch.distributed import free_port  # noqa: E402

GROUPS = {
    "non-finite checks": ("aten::isfinite", "aten::isinf", "aten::isnan"),
    "norm ops": ("aten::linalg_vector_norm", "aten::norm", "aten::_foreach_norm", "aten::frobenius_norm"),
    "device-to-host reads": ("aten::_local_scalar_dense",),
    "all-reduces": ("c10d::allreduce_", "gloo:all_reduce", "record_param_comms"),
}


def count_ops(trace_dir):
    """Counts of each op name in rank 0's trace."""
    trace = next(p for p in Path(trace_dir).rglob("*rank0*.json*"))
    opener = gzip.open if trace.suffix == ".gz" else open
    with opener(trace, "rt") as f:
        events = json.load(f)["traceEvents"]
    return Counter(e["name"] for e in events if e.get("ph") == "X" and e.get("cat") == "cpu_op")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=64)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="profiled steps")
    ap.add_argument("overrides", nargs="*", help="config overrides (default: bf16, ZeRO-1)")
    args = ap.parse_args()
    first, last = 4, 3 + args.steps
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.ranks),
               "--master_port", str(free_port()), "train.py", f"model.n_layers={args.layers}", "model.d_model=64",
               "model.n_heads=2", "train.seq_len=64", "train.micro_batch_size=2", "train.precision=bf16",
               "train.zero_stage=1", f"train.max_steps={last + 1}", f"train.log_every={last + 1}",
               f"train.eval_every={last + 1}", "train.eval_batches=1", "train.final_eval_windows=0",
               "monitor.every=1000", f"train.profile_steps={first}:{last}", f"train.out_dir={tmp}/run",
               *args.overrides]
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True,
                       env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
        ops = count_ops(f"{tmp}/run/tensorboard")
    settings = [a for a in cmd[cmd.index("train.py") + 1:] if not a.startswith("train.out_dir=")]
    print(f"{args.layers} layers, {args.ranks} CPU ranks, {' '.join(settings)}; per step, mean of {args.steps} "
          "profiled steps, rank 0")
    print("| ops | per step | of which |")
    print("|---|---:|---|")
    for group, names in GROUPS.items():
        found = {n: ops[n] for n in names if ops[n]}
        detail = ", ".join(f"`{n}` {v / args.steps:g}" for n, v in found.items())
        print(f"| {group} | {sum(found.values()) / args.steps:g} | {detail} |")


if __name__ == "__main__":
    main()
