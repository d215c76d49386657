"""The GPU benchmark: one command on one GPU, about 8 minutes, one markdown table.

    python bench/gpu.py                    # writes bench/results/gpu/<GPU name>.md and prints it
    python bench/gpu.py --smoke            # the same stages at toy sizes, on whatever device there is

Stages, each a subprocess with its own time limit (a stage that fails or runs out of time gets a
row saying so and the table is still written):

Time limits: 170 s, 110 s, 110 s and 80 s, 8 minutes in all.

1. every preset's training step relative to vanilla at 32 layers x d_model 1,024 x T 2,048, bf16,
   eager and compiled (`bench/step_time.py --gpu --compile`), with its peak memory;
2. the trainer (`train.py`, vanilla post-norm, ZeRO-1, bf16, built-in corpus as bytes) at 64 and
   128 layers of that width: tokens/s, MFU and peak memory of its last logged steps, read from
   metrics.jsonl (the run is stopped once they are written, before its final evaluation and save);
3. the collapse monitors at 64 layers of that width (`bench/monitor_overhead.py`, probe of 4 x 512
   tokens, 4 heads): one monitor step in training steps, its extra memory.
"""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WIDTH = ["model.d_model=1024", "model.n_heads=16", "model.max_seq_len=2048", "train.seq_len=2048",
         "train.micro_batch_size=4"]
# the toy sizes of --smoke: every stage runs, in seconds, on a CPU
SMOKE_WIDTH = ["model.d_model=32", "model.n_heads=2", "model.max_seq_len=32", "train.seq_len=32",
               "train.micro_batch_size=2"]
TRAIN_STEPS = 30


def stages(smoke, tmp, data=None):
    """(name, command, time limit in seconds, the file the stage leaves) for each stage."""
    py = sys.executable
    if smoke:
        step_args = ["--n-layers", "2", "--d-model", "32", "--n-heads", "2", "--seq-len", "32", "--batch", "2",
                     "--vocab", "256", "--repeats", "1", "--warmup", "1", "--presets", "vanilla,pre"]
        depths, width, steps, limit = (2,), SMOKE_WIDTH, 4, 60  # one trainer launch: the loop is the same
    else:
        step_args = ["--gpu", "--compile", "--repeats", "5"]
        depths, width, steps, limit = (64, 128), WIDTH, TRAIN_STEPS, 110
    # limits that add up to 8 minutes; typical stages take well under them
    out = [("step time", [py, "bench/step_time.py", *step_args, "--json", str(tmp / "step.json")], limit + 60,
            tmp / "step.json")]
    for depth in depths:
        run = tmp / f"train{depth}"
        out.append((f"trainer, {depth} layers", [
            py, "train.py", "--config", "configs/methods/vanilla.yaml", f"model.n_layers={depth}", *width,
            f"data.path={data}" if data else "data.tokenizer=bytes", "train.zero_stage=1", f"train.max_steps={10 * steps}", f"train.log_every={steps // 2}",
            "train.eval_every=100000", "monitor.every=0", f"train.out_dir={run}"], limit, run / "metrics.jsonl"))
    monitor_width = [*width, "monitor.seq_len=32" if smoke else "monitor.seq_len=512", "monitor.heads=4" if not smoke
                     else "monitor.heads=1"]
    out.append(("monitors", [py, "bench/monitor_overhead.py", "--steps", "4" if smoke else "10", "--monitor-steps", "2",
                             "--json", str(tmp / "monitors.json"), f"model.n_layers={depths[0]}", *monitor_width],
                limit - 30, tmp / "monitors.json"))
    return out, steps


def logged_steps(metrics, step):
    """The training lines of metrics.jsonl up to `step`, once the line of `step` is there."""
    if not metrics.is_file():
        return None
    lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    lines = [r for r in lines if "loss" in r and r["step"] <= step]
    return lines if lines and lines[-1]["step"] == step else None


def run_stage(command, limit, done=None):
    """Run command from the checkout in a session of its own; stop it at `limit` seconds or as soon as
    done() is true. Returns None when it succeeded (or done() came true), else why not."""
    proc = subprocess.Popen(command, cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    start = time.monotonic()
    while proc.poll() is None:
        if done is not None and done():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None
        if time.monotonic() - start > limit:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return f"did not finish in {limit} s"
        time.sleep(1)
    if done is not None and done():
        return None
    tail = proc.stdout.read().strip().splitlines()[-3:]
    return f"exit {proc.returncode}: {' / '.join(tail)}"[:300] if proc.returncode else None


def table(results):
    """One markdown table from the stages' results."""
    rows = ["| measurement | value |", "|---|---|"]
    step = results.get("step time")
    if isinstance(step, dict):
        vanilla = {r["compiled"]: r for r in step["rows"] if r["preset"] == "vanilla" and "ms" in r}
        for compiled in (False, True):
            if compiled in vanilla:
                v = vanilla[compiled]
                rows.append(f"| vanilla step, {'compiled' if compiled else 'eager'} | {v['ms']:.1f} ms, "
                            f"{v['tflops']:.0f} TFLOP/s" + (f", MFU {v['mfu']:.3f}" if v["mfu"] else "") + " |")
        for r in step["rows"]:
            label = f"{r['preset']} / vanilla, {'compiled' if r['compiled'] else 'eager'}"
            base = vanilla.get(r["compiled"])
            if "failed" in r:
                rows.append(f"| {label} | failed: {r['failed']} |")
            elif r["preset"] != "vanilla" and base:
                rows.append(f"| {label} | {r['ms'] / base['ms']:.3f} |")
        if step.get("peak_memory_gib"):
            rows.append(f"| step-time benchmark, peak memory (all variants resident) | {step['peak_memory_gib']:.1f} GiB |")
    elif step:
        rows.append(f"| step time | {step} |")
    for name, value in results.items():
        if name.startswith("trainer"):
            if isinstance(value, list):
                last = value[-1]
                mfu = f", MFU {last['mfu']:.3f}" if last.get("mfu") is not None else ""
                rows.append(f"| {name} (ZeRO-1, steps {value[0]['step']}–{last['step']}) | "
                            f"{last['tokens_per_s']:.0f} tokens/s{mfu}, peak {last['peak_memory_mb'] / 1024:.1f} GiB |")
            else:
                rows.append(f"| {name} | {value} |")
    monitors = results.get("monitors")
    if isinstance(monitors, dict):
        rows.append(f"| one monitor step (every {monitors['every']} steps) | {monitors['monitor_s'] / monitors['step_s']:.2f} "
                    f"training steps ({1000 * monitors['monitor_s']:.0f} ms); time ratio {monitors['ratio']:.4f} |")
        extra = monitors["held_bytes"] + monitors["probe_peak_bytes"]
        rows.append(f"| the monitor's extra memory (pre-step copies + probe) | {extra / 2**20:.0f} MiB "
                    f"({extra / monitors['layer_bytes']:.2f} layers' parameters; a training step: "
                    f"{monitors['step_peak_bytes'] / 2**30:.1f} GiB above its start) |")
    elif monitors:
        rows.append(f"| monitors | {monitors} |")
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="toy sizes: check the command end to end on any machine")
    ap.add_argument("--output", default=str(ROOT / "bench/results/gpu"), help="folder of the markdown file")
    ap.add_argument("--data", help="the trainer's data.path (default: the built-in corpus as bytes)")
    args = ap.parse_args()
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    if device == "CPU" and not args.smoke:
        print("error: no CUDA GPU here: bench/gpu.py measures one; `--smoke` runs its stages at toy sizes on the CPU",
              file=sys.stderr)
        sys.exit(2)
    started = time.monotonic()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        plan, steps = stages(args.smoke, tmp, args.data)
        for name, command, limit, output in plan:
            print(f"[{time.monotonic() - started:5.0f} s] {name}: {' '.join(command[1:])}", flush=True)
            if name.startswith("trainer"):
                failure = run_stage(command, limit, lambda: logged_steps(output, steps) is not None)
                results[name] = failure or logged_steps(output, steps)
            else:
                failure = run_stage(command, limit)
                results[name] = failure or json.loads(output.read_text())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    import deepspeed

    text = (f"# GPU benchmark: {device}\n\n`python bench/gpu.py{' --smoke' if args.smoke else ''}` at {commit or '?'}, "
            f"torch {torch.__version__}, DeepSpeed {deepspeed.__version__}, {time.monotonic() - started:.0f} s in all.\n\n"
            f"{table(results)}\n")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    path = out / (re.sub(r"[^A-Za-z0-9]+", "_", device).strip("_") + ("_smoke" if args.smoke else "") + ".md")
    path.write_text(text)
    print(text)
    print(f"written: {path}")


if __name__ == "__main__":
    main()
