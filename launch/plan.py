"""Plan a GPU run before queueing it: parameters, memory per GPU under each ZeRO stage with and
without activation checkpointing, FLOPs per token, tokens/s, and the setting that fits.

    python -m launch.plan --config configs/methods/vanilla.yaml --config configs/gpu/l192_d1024_8gpu.yaml \
        --gpus 8 model.vocab_size=50304

Why: a 1,000-layer model that does not fit is otherwise found out after the job has waited in the
queue and DeepSpeed has built its engine. This is arithmetic on the config and on the model built
on the meta device (exact parameter counts, no memory), so it runs in seconds without a GPU. Its
figures are estimates, not measurements (docs/gpu_plan.md).

Model states, bytes per parameter as DeepSpeed's 16-bit optimizers hold them: 2 (weights) + 2
(grads) + 4 (the fp32 copy of the grads the optimizer steps with) + 12 (fp32 master weights, Adam
m and v). ZeRO-1 shards the last two over N GPUs, ZeRO-2 also the grads, ZeRO-3 also the weights,
gathering one layer's weights and grads at a time:
    ZeRO-0: 20    ZeRO-1: 4 + 16/N    ZeRO-2: 2 + 18/N    ZeRO-3: 20/N + 4 x the largest layer
ZeRO-2 equals DeepSpeed's estimate_zero2_model_states_mem_needs. Its ZeRO-3 estimator reuses the 18/N
of ZeRO-2, so it leaves out each rank's shard of the 16-bit weights (ZeRO-3 partitions them too):
the plan's ZeRO-3 figure is DeepSpeed's + 2·P/N. fp32 runs hold 4 + 4 + 8, plus under ZeRO-1/2 the
4/N of the fp32 partition those clone. DeepSpeed's buffers come on top (`buffer_bytes`): the
optimizer step's fp32 temporaries, the reduce bucket of ZeRO-2/3 and ZeRO-3's live and prefetched
parameters, sized by the run's DeepSpeed config; DeepSpeed's defaults keep every parameter of a
model under 10⁹ gathered on every GPU.
Not counted: the CUDA context and fragmentation; the headroom is for them. A setting must also fit
with the plan's own error as measured: its one check against a real run's peak (docs/gpu_plan.md)
found it 14% under (plan = 0.86 × peak), so a setting must fit in 0.86 of the budget.

Activations, bytes a block keeps for backward per token, e bytes per element (2 in bf16):
    e·d·(1 block input + 2 Q, K + 1 V + 1 attention output + 1 LayerNorm input + 1 MLP input
         + 4 GELU input + 4 GELU output + 1 LayerNorm input) = 16·e·d
    + 4·h (SDPA's fp32 log-sum-exp: flash keeps O(T) per head, never the T×T matrix)
    + 16 (the two LayerNorms' fp32 mean and rstd).
gapfree keeps 17·e·d, shaped 20·e·d (their cumulative means and gains), surgery nothing more per
token, spectral its per-block QR factors ((2e + 8)·d² bytes). Counted with saved-tensor hooks on a
CPU block (tests/test_plan.py). The loss, in fp32 over the vocabulary, peaks at 12·V bytes per
token in backward (log-probabilities, their grad, the logits' grad). With checkpointing every k-th
block, blocks 0, k, 2k, ... keep only their input (e·d per token) and are recomputed one at a
time: peak = those inputs + the other blocks in full + max(loss, one block).

Recommendation: the lowest ZeRO stage that fits with checkpointing off, else the setting that
recomputes the fewest blocks, at the lowest stage that allows it. Lower stages communicate less:
ZeRO-0 and 1 reduce gradients once per optimizer step, ZeRO-2 every micro-step, and ZeRO-3 also
gathers the weights twice per micro-step. Checkpointing comes last: DeepSpeed overlaps its
communication with compute, while recomputing (a third more FLOPs if every block is) lengthens every
step. Communication itself is not modeled.
"""

import argparse
import contextlib
import sys
from pathlib import Path

from configs import ConfigError, exit_on_error, load_config

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs/default.yaml"
GIB = 2**30
# what an "80GB" H100 gives CUDA: torch.cuda.get_device_properties(0).total_memory, ~81,090 MiB
# (nvidia-smi shows 81,559 MiB; its 80 is not in GiB)
H100_GIB = 81090 / 1024
HEADROOM = 0.10
# the plan was 14% under the peak of the one run it was checked against (8.35 of 9.72 GiB; 1,000
# layers x d_model 256, ZeRO-3, 2 CPU ranks; docs/gpu_plan.md). Until a GPU run checks it, a setting
# must fit with that margin too: a plan that fits to the last GiB would run out of memory after the
# job waited in the queue.
PLAN_ERROR = 0.14
# [T, d]-sized tensors a block saves per token, by attention variant (see the docstring)
SAVED_PER_TOKEN = {"softmax": 16, "gapfree": 17, "shaped": 20}


def bytes_per_param(mixed):
    """(16-bit or fp32 weights, grads, fp32 grad copy, master + Adam m, v) in bytes."""
    return (2, 2, 4, 12) if mixed else (4, 4, 0, 8)


def model_state_bytes(P, N, largest, mixed):
    """Bytes per GPU of weights, grads and optimizer states for ZeRO 0..3, as {stage: bytes}."""
    weights, grads, copy, optim = bytes_per_param(mixed)
    total = weights + grads + copy + optim
    sharded = [0, copy + optim, grads + copy + optim, total]
    out = {s: P * (total - sharded[s]) + P * sharded[s] / N for s in range(4)}
    out[3] += (weights + grads) * largest  # the layer in flight, gathered whole
    if not mixed:  # ZeRO-1/2 step a copy of their fp32 partition even when the weights are fp32; ZeRO-3 does not
        out[1] += 4 * P / N
        out[2] += 4 * P / N
    return out


def buffer_bytes(ds, P, N, e):
    """Bytes per GPU DeepSpeed holds besides the model states, for ZeRO 0..3, from the run's DeepSpeed
    config (its defaults where the config is silent). Measured on CPU in fp32 (docs/gpu_plan.md):
    - the optimizer step's transient: AdamW's temporaries and the flattened gradient, three fp32
      tensors the size of what one step covers: the whole model (ZeRO-0), this GPU's partition
      (ZeRO-1/2), one sub-group of at most sub_group_size elements (ZeRO-3);
    - ZeRO-2 and 3 reduce gradients through a bucket of reduce_bucket_size elements;
    - ZeRO-3 keeps up to stage3_max_live_parameters gathered parameters that are used again within
      stage3_max_reuse_distance (on a model below that size: all of them, on every GPU), prefetches
      stage3_prefetch_bucket_size more, and holds its partition once more, flat."""
    zero = ds.get("zero_optimization", {})
    stepped = {0: P, 1: P / N, 2: P / N, 3: min(P / N, zero.get("sub_group_size", 1e9))}
    out = {s: 12 * stepped[s] for s in range(4)}
    bucket = e * zero.get("reduce_bucket_size", 5e8)
    live = e * min(P, zero.get("stage3_max_live_parameters", 1e9), max(zero.get("stage3_max_reuse_distance", 1e9), 0))
    out[2] += bucket
    out[3] += bucket + live + e * zero.get("stage3_prefetch_bucket_size", 5e7) + e * P / N
    return out


def deepspeed_estimates(P, N, largest):
    """DeepSpeed's own GPU figures for ZeRO-2 and 3 (16-bit training, nothing offloaded)."""
    # importing deepspeed logs its accelerator choice to stdout, which holds the table
    with contextlib.redirect_stdout(sys.stderr):
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    # their GPU figures depend on the number of GPUs in all, not on how nodes split them
    _, zero2 = estimate_zero2_model_states_mem_needs(P, N, 1, cpu_offload=False)
    _, zero3, _ = estimate_zero3_model_states_mem_needs(P, largest, N, 1, cpu_offload=False,
                                                         cpu_offload_params=False, zero_init=True)
    return {2: zero2, 3: zero3}


def block_bytes(m, tokens, e):
    """Bytes one block keeps for backward over `tokens` tokens (the docstring's formula)."""
    spectral = (2 * e + 8) * m.d_model**2 if m.weights == "spectral" else 0
    return tokens * (SAVED_PER_TOKEN[m.attention] * e * m.d_model + 4 * m.n_heads + 16) + spectral


def checkpointed_blocks(n_layers, k):
    return len(range(0, n_layers, k)) if k else 0  # the trainer checkpoints blocks i with i % k == 0


def activation_bytes(m, micro_batch, seq_len, e, k):
    """Peak bytes of activations of one micro-batch with checkpointing every k-th block (0 = off)."""
    tokens = micro_batch * seq_len
    block, n = block_bytes(m, tokens, e), checkpointed_blocks(m.n_layers, k)
    loss = tokens * (12 * m.vocab_size + e * m.d_model)  # with the head's input
    return n * tokens * e * m.d_model + (m.n_layers - n) * block + max(loss, block if n else 0)


def count_parameters(m):
    """(all parameters, one block's, the largest layer's, its name) of the model built on the meta device."""
    import torch

    from model import Transformer

    with torch.device("meta"):
        model = Transformer(m)
    # DeepSpeed's "largest layer": the most parameters one module holds itself (ZeRO-3 gathers it whole)
    own = ((name, sum(p.numel() for p in mod.parameters(recurse=False))) for name, mod in model.named_modules())
    name, largest = max(own, key=lambda item: item[1])
    total = sum(p.numel() for p in model.parameters())  # a tied weight is yielded once
    return total, sum(p.numel() for p in model.blocks[0].parameters()), largest, name


def plan(cfg, gpus, gpu_memory_gb=H100_GIB, mfu=0.35, peak_tflops=989.0):
    """The plan's figures (counts, bytes per GPU, FLOPs) and the recommended setting, as a dict."""
    from launch.deepspeed_config import deepspeed_config, grad_accum_steps
    from model.flops import flops_per_token

    if gpus < 1 or gpu_memory_gb <= 0 or not 0 < mfu <= 1 or peak_tflops <= 0:
        raise ConfigError(f"--gpus {gpus} --gpu-memory-gb {gpu_memory_gb} --mfu {mfu} --peak-tflops {peak_tflops}: "
                          "need at least one GPU, memory and peak > 0, 0 < mfu <= 1")
    m, t = cfg.model, cfg.train
    mixed = t.precision != "fp32"  # auto is bf16 on a GPU
    e = 2 if mixed else 4
    P, per_block, largest, largest_name = count_parameters(m)
    held = model_state_bytes(P, gpus, largest, mixed)
    buffers = buffer_bytes(deepspeed_config(t, "bf16" if mixed else "fp32", grad_accum_steps(t, gpus)), P, gpus, e)
    states = {s: held[s] + buffers[s] for s in range(4)}
    budget = (1 - HEADROOM) * gpu_memory_gb * GIB * (1 - PLAN_ERROR)

    def activations(k, micro_batch=t.micro_batch_size):
        return activation_bytes(m, micro_batch, t.seq_len, e, k)

    def fits(s, k):
        return states[s] + activations(k) <= budget

    choice = next(((s, 0) for s in range(4) if fits(s, 0)), None) or min(
        ((s, k) for s in range(4) for k in range(m.n_layers, 0, -1) if fits(s, k)),
        key=lambda sk: (checkpointed_blocks(m.n_layers, sk[1]), sk[0]), default=None)
    rec = None
    if choice:
        s, k = choice
        rec = {"zero_stage": s, "activation_checkpointing": k, "bytes": states[s] + activations(k),
               "recomputed_blocks": checkpointed_blocks(m.n_layers, k),
               "max_micro_batch": int((budget - states[s]) // activations(k, 1))}
    # (largest micro-batch, stage) without checkpointing: the stage that allows the most, the lowest of equals
    most = max(((int((budget - states[s]) // activations(0, 1)), -s) for s in range(4)))
    flops = flops_per_token(m, t.seq_len, t.micro_batch_size * t.seq_len)
    return {
        "parameters": P, "parameters_per_block": per_block, "largest_layer": largest,
        "largest_layer_name": largest_name, "gpus": gpus, "precision": "bf16" if t.precision == "auto" else t.precision,
        "model_state_bytes": held, "buffer_bytes": buffers, "deepspeed_bytes": deepspeed_estimates(P, gpus, largest) if mixed else None,
        "activation_bytes": {k: activations(k) for k in {0, 1, rec["activation_checkpointing"] if rec else 0}},
        "budget_bytes": budget, "flops_per_token": flops, "tokens_per_s": mfu * peak_tflops * 1e12 * gpus / flops,
        "recommended": rec, "max_micro_batch_without_checkpointing": (max(most[0], 0), -most[1]),
        "configured_bytes": states[t.zero_stage] + activations(t.activation_checkpointing),
    }


def check_gpu_memory(cfg, gpus, local_rank):
    """train.py's check before the engine is built, on a GPU: `memory_verdict` for this GPU's memory.
    Nothing on a CPU, or with the optimizer offloaded (which the plan does not model)."""
    import torch

    if not torch.cuda.is_available() or cfg.train.offload_optimizer:
        return None
    # this rank's own GPU, so that no rank opens a context on another's
    return memory_verdict(cfg, gpus, torch.cuda.get_device_properties(local_rank).total_memory)


def memory_verdict(cfg, gpus, memory):
    """Stop a run whose own setting (ZeRO stage, checkpointing, micro-batch) the plan puts above its
    GPUs' `memory` bytes: it would run out of memory after the queue and the engine's start-up, and
    the plan is under the measured peak, not over it. Where it fits only without the plan's headroom
    and measured error, return a warning line (None if it fits with them)."""
    r = plan(cfg, gpus, memory / GIB)
    t, need, rec = cfg.train, r["configured_bytes"], r["recommended"]
    if need <= r["budget_bytes"]:
        return None
    setting = (f"train.zero_stage={t.zero_stage} train.activation_checkpointing={t.activation_checkpointing} "
               f"train.micro_batch_size={t.micro_batch_size} on {gpus} GPU(s)")
    fix = (f"use train.zero_stage={rec['zero_stage']} train.activation_checkpointing={rec['activation_checkpointing']}"
           if rec else "nothing fits: lower train.micro_batch_size or train.seq_len, or use more GPUs")
    table = f"`python -m launch.plan --gpus {gpus}` with the same config and overrides shows the table"
    if need > memory:
        raise ConfigError(f"{setting}: the plan needs {gib(need)} per GPU and the GPU holds {gib(memory)}; {fix} ({table})")
    return (f"warning: {setting}: the plan needs {gib(need)} per GPU, more than the {gib(r['budget_bytes'])} it keeps "
            f"within the GPU's {gib(memory)} for headroom and its own measured error; it may run out of memory. "
            f"To be safe, {fix} ({table})")


def gib(b):
    return f"{b / GIB:,.2f} GiB"


def table(cfg, r, gpu_memory_gb, mfu, peak_tflops):
    """The figures as one Markdown table, then the recommendation."""
    m, t, N, act = cfg.model, cfg.train, r["gpus"], r["activation_bytes"]
    weights, grads, copy, optim = bytes_per_param(r["precision"] != "fp32")
    total = weights + grads + copy + optim
    formula = {0: f"{total} B/param", 1: f"{weights + grads} + {copy + optim}/N B/param",
               2: f"{weights} + {total - weights}/N B/param",
               3: f"{total}/N B/param + {weights + grads} B × largest layer"}
    why = {2: "the same accounting", 3: "it counts 18/N, leaving out each GPU's 2/N shard of 16-bit weights"}
    rows = [("parameters", f"{r['parameters']:,}", f"L = {m.n_layers}, d = {m.d_model}, max_seq_len "
             f"{m.max_seq_len:,}, vocab {m.vocab_size:,} (the data's with data.path, else model.vocab_size)"),
            ("parameters per block", f"{r['parameters_per_block']:,}", ""),
            ("largest layer", f"{r['largest_layer']:,}", f"`{r['largest_layer_name']}`")]
    for s in range(4):
        ds = (r["deepspeed_bytes"] or {}).get(s)
        held = r["model_state_bytes"][s] + r["buffer_bytes"][s]
        rows.append((f"ZeRO-{s} model states / GPU", gib(r["model_state_bytes"][s]),
                     formula[s] + (f"; DeepSpeed's estimator {gib(ds)}: {why[s]}" if ds else "")
                     + (f"; DeepSpeed's buffers {gib(r['buffer_bytes'][s])}" if r["buffer_bytes"][s] else "")
                     + f"; with activations {gib(held + act[0])} (checkpointing off), {gib(held + act[1])} (every block)"))
    rows += [(f"activations / GPU, {t.micro_batch_size} × {t.seq_len:,} tokens", gib(act[0]), "checkpointing off"),
             ("activations / GPU, checkpointing every block", gib(act[1]), "train.activation_checkpointing=1"),
             ("FLOPs per token", f"{r['flops_per_token']:.3e}", "model/flops.py: 6N + 12·L·T·d"),
             ("tokens/s", f"{r['tokens_per_s']:,.0f}",
              f"MFU {mfu:g} × {peak_tflops:g} TFLOP/s × {N} GPUs / FLOPs per token")]
    lines = [f"{N} GPUs × {gpu_memory_gb:.2f} GiB, {r['precision']}: {gib(r['budget_bytes'])} per GPU for the "
             f"figures below, after {HEADROOM:.0%} headroom and the plan's measured error ({PLAN_ERROR:.0%} under a "
             "real peak)", "", "| | value | note |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    rec, (most, stage) = r["recommended"], r["max_micro_batch_without_checkpointing"]
    if rec is None:
        return "\n".join(lines + ["", "Recommendation: nothing fits, not even ZeRO-3 with every block checkpointed: "
                                  "lower train.micro_batch_size or train.seq_len, or use more GPUs."])
    k, n = rec["activation_checkpointing"], rec["recomputed_blocks"]
    cost = f"; recomputing {n} of {m.n_layers} blocks adds ≈ {n / m.n_layers / 3:.0%} to a step's FLOPs" if k else ""
    largest = (f"the largest without checkpointing is {most} (ZeRO-{stage})" if most else
               "none fits without checkpointing")
    lines += ["", f"Recommendation: train.zero_stage={rec['zero_stage']} train.activation_checkpointing={k} "
              f"({gib(rec['bytes'])} per GPU{cost}). Micro-batch {t.micro_batch_size}: at most {rec['max_micro_batch']}"
              f" at this setting; {largest}."]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m launch.plan",
                                 description="Plan a GPU run: memory per ZeRO stage, FLOPs, tokens/s, what fits.")

    def error(message):  # one line, as for a bad config key, not argparse's usage block
        raise ConfigError(f"{message} (see python -m launch.plan --help)")

    ap.error = error
    ap.add_argument("--config", action="append", default=[],
                    help="YAML file; repeat to merge, later wins (default: configs/default.yaml)")
    ap.add_argument("--gpus", type=int, required=True, help="GPUs in all, over every node")
    ap.add_argument("--gpu-memory-gb", type=float, default=H100_GIB,
                    help=f"memory per GPU in GiB, as torch's total_memory reports it (default {H100_GIB:.2f}: an H100 80GB)")
    ap.add_argument("--mfu", type=float, default=0.35, help="model FLOPs utilization assumed for tokens/s")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU (989: H100 SXM)")
    ap.add_argument("overrides", nargs="*", help="dotted key=value, e.g. model.vocab_size=50304")
    args = exit_on_error(ap.parse_intermixed_args, sys.argv[1:] if argv is None else argv)
    cfg = exit_on_error(load_config, args.config or [DEFAULT_CONFIG], args.overrides)
    if cfg.data.path or cfg.data.mix:  # the vocabulary is the data's; the built-in corpus is not built for a plan
        from data.resolve import resolve_data

        exit_on_error(resolve_data, cfg)
    r = exit_on_error(plan, cfg, args.gpus, args.gpu_memory_gb, args.mfu, args.peak_tflops)
    print(table(cfg, r, args.gpu_memory_gb, args.mfu, args.peak_tflops))


if __name__ == "__main__":
    main()
