"""Why post-norm needs the stack-norm rule at depth: the LayerNorms after each residual add compose.

    python bench/stack_norms.py [--layers 1000] [--steps 30] [--every 5] [--method gapfree] [key=value ...]

Trains the same model (configs/sweeps/depth_bytes.yaml, model.depth_scaling.alpha=1, the same seed,
data and steps) twice, without and with model.depth_scaling.stack_norm_rule, and prints one
Markdown table of both every --every steps: the training loss; over the 2L LayerNorms after the
adds, the spread (std over features) of the summed log gains, sum_l log|g_l|, which is how much
the stack as a whole stretches one coordinate against another, and the norm of the summed biases
|sum_l b_l|, a shift shared by every token; the layers whose output has collapsed (stable rank
<= 1.2 or token cosine >= 0.9, the monitors' defaults) and the smallest stable rank, on 8 held-out sequences; and the first
block's gradient norm over the last block's. One process, plain torch AdamW with Fathom's
parameter groups and lr schedule, so it runs on a CPU without DeepSpeed.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from configs import exit_on_error, load_config  # noqa: E402
from data.loader import TrainBatches  # noqa: E402
from data.meta import train_token_counts  # noqa: E402
from data.resolve import resolve_data  # noqa: E402
from model import Transformer  # noqa: E402
from model.optimizer_groups import lr_factor, parameter_groups  # noqa: E402
from monitors.collapse import measure_layers  # noqa: E402
from monitors.metrics import collapsed, read_once  # noqa: E402
from monitors.probe import held_out_tokens  # noqa: E402


def stack_norm_state(model):
    """(std over features of sum_l log|g_l|, |sum_l b_l|) over the LayerNorms after each add."""
    norms = [join.norm for block in model.blocks for join in (block.attn_residual, block.mlp_residual)]
    log_gain = torch.stack([n.weight.detach().abs().log() for n in norms]).sum(0)
    return float(log_gain.std()), float(torch.stack([n.bias.detach() for n in norms]).sum(0).norm())


def layer_state(model, tokens, cfg):
    """(layers collapsed by the monitors' criteria, the smallest stable rank) on `tokens`."""
    layers = read_once(measure_layers(model, model, tokens, [0]))
    down = sum(collapsed(m, cfg.monitor.collapse_threshold, cfg.monitor.stable_rank_threshold) for m in layers)
    return down, min(m["stable_rank"] for m in layers)


def block_grad(block):
    return torch.cat([p.grad.flatten() for p in block.parameters() if p.grad is not None]).norm()


def train(cfg, steps, every, probe_tokens):
    """Yield (step, loss, spread, bias, collapsed layers, min stable rank, grad ratio) every `every` steps."""
    path, meta = resolve_data(cfg)
    torch.manual_seed(cfg.train.seed)
    model = Transformer(cfg.model)
    model.init_head_bias(train_token_counts(path, meta))
    groups = parameter_groups(model, cfg.train)
    optimizer = torch.optim.AdamW(groups, betas=(cfg.train.beta1, cfg.train.beta2))
    peak = [g["lr"] for g in optimizer.param_groups]
    t = cfg.train
    accum = t.global_batch // t.micro_batch_size if t.global_batch else t.grad_accum
    batches = TrainBatches(path, t.seq_len, t.micro_batch_size, accum, 1, 0, t.seed)
    for step in range(steps):
        for g, lr in zip(optimizer.param_groups, peak):
            g["lr"] = lr * lr_factor(step, cfg)
        total = 0.0
        for micro in range(accum):
            x, y = batches.micro_batch_at(step * batches.global_batch, micro)
            loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()) / accum
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        ratio = float(block_grad(model.blocks[0]) / block_grad(model.blocks[-1]))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % every == 0:
            yield (step + 1, float(total), *stack_norm_state(model), *layer_state(model, probe_tokens, cfg), ratio)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps (the recipe warms up over 30)")
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--method", default="gapfree", help="preset of configs/methods/")
    ap.add_argument("--output", help="also write the table to this Markdown file")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. train.lr=3e-3")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = {}
    for rule in (False, True):
        cfg = exit_on_error(load_config, ["configs/sweeps/depth_bytes.yaml", f"configs/methods/{args.method}.yaml"], [
            "train.micro_batch_size=8", "train.global_batch=32", "model.depth_scaling.alpha=1", *args.overrides,
            f"model.n_layers={args.layers}", f"model.depth_scaling.stack_norm_rule={rule}"])
        start = time.time()
        for row in train(cfg, args.steps, args.every, held_out_tokens(cfg, 8, cfg.train.seq_len)):
            rows.setdefault(row[0], {})[rule] = row[1:]
            print(f"rule {rule} step {row[0]}: {row[1:]} ({time.time() - start:.0f} s)", file=sys.stderr, flush=True)
    lines = [f"`{args.method}`, {args.layers} layers, alpha = 1, lr {cfg.train.lr:g}, without / with the stack-norm "
             "rule (`python bench/stack_norms.py " + " ".join(argv if argv is not None else sys.argv[1:]) + "`)", "",
             "| step | train loss | spread of sum log gains | norm of sum of biases | collapsed layers | "
             "min stable rank | grad norm, first / last block |", "|---|---|---|---|---|---|---|"]
    for step, pair in rows.items():
        cols = zip(*(pair[rule] for rule in (False, True)))
        formats = ("{:.3f}", "{:.2f}", "{:.2f}", "{}", "{:.2f}", "{:.2g}")
        lines.append(f"| {step} | " + " | ".join(" / ".join(f.format(v) for v in col) for f, col in zip(formats, cols)) + " |")
    text = "\n".join(lines) + "\n"
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
