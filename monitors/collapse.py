"""Per-depth collapse monitors: watch rank collapse coming, layer by layer, while training.

At step 0 and every `monitor.every` steps a fixed probe batch of held-out tokens (`monitor.batch`
sequences of `monitor.seq_len` tokens) goes through the model (no grad, eval mode; forward hooks,
so the model code is untouched) and, for every layer (layer 0 = output of the first block), we
record the hidden-state metrics of monitors/metrics.py (the same functions as `python -m
monitors.probe`), the entropy of each head's attention rows, and sigma_2/sigma_1 of each head's
effective attention matrix (A - C for gap removal, alpha I + beta P - gamma C for shaped attention),
rebuilt explicitly here for `monitor.heads` evenly spaced heads, off the training path. Each layer
is measured while its block runs, so no layer's output outlives it, and all of them are read from
the device in one copy.

On the same steps, around the optimizer step: the gradient norm of each block (DeepSpeed's full
gradients, any ZeRO stage) and the update-to-weight ratio |dW| / |W| of `monitor.update_layers`
evenly spaced blocks. The ratio needs the weights from before the step: each rank copies only its
own share of the fp32 master weights (a ZeRO partition is 1/world of them), and one all-reduce
sums the two norms over the ranks, so nothing holds a second full copy of a block.

Every rank runs the probe (ZeRO-3 gathers parameters collectively); rank 0 writes
`monitors.jsonl.gz` (4 significant digits: more than any plot or table shows), TensorBoard's
run-level summaries first (`collapse/`: the deepest layer's cosine, the lowest stable rank, the
number of collapsed layers), per-layer scalars in a group of their own (`layers/<metric>/layer_NNNN`
up to 64 layers; deeper, min, median and max over the layers), a labelled layer × step heatmap
figure per metric (`collapse_heatmap/<metric>`), and a warning the first time a layer collapses:
its cosine similarity reaches `monitor.collapse_threshold` or its stable rank falls to
`monitor.stable_rank_threshold`. Nothing here draws from the global RNG or changes a value the
training step uses, so the trajectory is the same with monitors on or off.
"""

import contextlib

import torch

from launch.run_dir import RunDir, append_jsonl, read_jsonl, rewrite_jsonl
from monitors.metrics import attention_entropy, collapsed, hidden_state_metrics, read_once, sigma_ratio

# a heatmap needs two records to be one, and its matplotlib layout costs ~0.4 s a figure (seconds a
# record, most of a short run's start-up): drawn at the second record, then every fifth
HEATMAP_EVERY = 5
HEATMAP_METRICS = ("cos_sim", "t_sim", "stable_rank", "rms", "attn_sigma_ratio", "grad_norm", "update_ratio")
# TensorBoard draws one card per scalar: past this many layers, each metric's spread over the layers
# (min, median, max) instead; the heatmaps and monitors.jsonl.gz keep every layer
MAX_LAYER_SCALARS = 64


def evenly_spaced(n, k):
    """k of range(n), evenly spaced with the first and the last (all of them when k is 0 or >= n)."""
    if k == 0 or k >= n:
        return list(range(n))
    return [n - 1] if k == 1 else sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


@contextlib.contextmanager
def block_hooks(model, on_block, on_mixer=None):
    """While inside: on_block(i, output) after block i runs, and on_mixer(mixer, (q, k, v)) before
    each attention mixer runs; the model code is untouched."""
    handles = [b.register_forward_hook(lambda module, inputs, output, i=i: on_block(i, output.detach()))
               for i, b in enumerate(model.blocks)]
    if on_mixer is not None:
        handles += [b.attn.mixer.register_forward_pre_hook(on_mixer) for b in model.blocks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def measure_layers(forward, model, tokens, heads):
    """Every layer's metrics on `tokens`, each computed as its block runs (no layer's output is kept):
    the hidden-state metrics, and the attention metrics of the given heads. Tensors on the device;
    `read_once` reads them all at once. `forward` runs the model (the DeepSpeed engine in training)."""
    hidden, attention = [], []

    def on_mixer(mixer, inputs):
        q, k, _ = inputs
        p, a = mixer.attention_matrices(q[:, heads].float(), k[:, heads].float(), heads)
        attention.append({"attn_entropy": attention_entropy(p), "attn_sigma_ratio": sigma_ratio(a)})

    was_training = model.training
    model.eval()
    try:
        with block_hooks(model, lambda i, output: hidden.append(hidden_state_metrics(output)), on_mixer):
            forward(tokens)
    finally:
        model.train(was_training)
    return [{"layer": i, **m, **a} for i, (m, a) in enumerate(zip(hidden, attention))]


def full_grad(p):
    from deepspeed.utils import safe_get_full_grad

    return safe_get_full_grad(p)


def zero0_masters(engine):
    """{parameter: its fp32 master weights} under DeepSpeed's bf16/fp16 ZeRO-0 wrappers, which keep them
    beside the module (FP16_UnfusedOptimizer: one tensor per parameter; FP16_Optimizer: one flat
    tensor per group, its parameters in order) where DeepSpeed's safe_get_* helpers do not reach;
    empty for every other optimizer."""
    optimizer = getattr(engine, "optimizer", None)
    masters = {}
    for params, fp32 in zip(getattr(optimizer, "fp16_groups", ()), getattr(optimizer, "fp32_groups", ())):
        masters.update(zip(params, fp32))
    for params, flat in zip(getattr(optimizer, "fp16_groups", ()), getattr(optimizer, "fp32_groups_flat", ())):
        offset = 0
        for p in params:
            masters[p] = flat.narrow(0, offset, p.numel()).view_as(p)
            offset += p.numel()
    return masters


def own_fp32(p, masters):
    """This rank's share of p's fp32 master weights, a view the optimizer step updates in place: its
    ZeRO-3 partition, its fragment of the ZeRO-1/2 (or bf16 optimizer) flat partition, which may be
    empty, its slice of a ZeRO-0 wrapper's flat master (`masters`), and p itself where the optimizer
    steps the module's own weights. No collective and no copy."""
    if hasattr(p, "ds_id"):
        from deepspeed.utils import safe_get_local_fp32_param

        own = safe_get_local_fp32_param(p)
    elif hasattr(p, "_hp_mapping"):
        own = None if p._hp_mapping is None else p._hp_mapping.get_hp_fragment()
    else:
        own = masters.get(p, p.detach())
    return p.new_empty(0, dtype=torch.float32) if own is None else own


def squared_norm(tensors, device):
    total = torch.zeros((), dtype=torch.float64, device=device)
    for t in tensors:
        if t is not None:
            total += t.detach().double().pow(2).sum().to(device)
    return total


def sum_over_ranks(t):
    """A tensor summed over the ranks, in place (one all-reduce; nothing to do in one process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t


def significant(value, digits=4):
    """A number, or lists and dicts of numbers, rounded to `digits` significant digits."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, list):
        return [significant(v, digits) for v in value]
    if isinstance(value, dict):
        return {k: significant(v, digits) for k, v in value.items()}
    return value


class CollapseMonitor:
    def __init__(self, forward, model, probe_tokens, cfg, out_dir, log, start_step=0):
        self.forward, self.model, self.probe = forward, model, probe_tokens
        self.every = cfg.every
        self.is_collapsed = lambda layer: collapsed(layer, cfg.collapse_threshold, cfg.stable_rank_threshold)
        self.log = log
        self.path = RunDir(out_dir).monitors
        self.history = []
        self.rewind(start_step)
        self.warned = {layer["layer"] for r in self.history for layer in r["layers"] if self.is_collapsed(layer)}
        self.deepest_cos = self.history[-1]["layers"][-1]["cos_sim"] if self.history else None
        self.update_blocks = evenly_spaced(len(model.blocks), cfg.update_layers)
        self.heads = evenly_spaced(model.blocks[0].attn.n_heads, cfg.heads)
        self.device = next(model.parameters()).device
        self.grad_norms = self.before = self.masters = None

    def rewind(self, step):
        """Forget the records after `step`: a resumed (or rolled back) run records them again."""
        if self.log.enabled:
            self.history = read_jsonl(self.path, step) if step else []
            rewrite_jsonl(self.path, self.history)

    def due(self, step):
        return self.every > 0 and step % self.every == 0

    # ---- around the optimizer step ------------------------------------------------------------

    def before_step(self):
        """Called after the last backward of a monitored step, before the optimizer step: every
        block's gradient norm (DeepSpeed's full gradients, one parameter at a time) and a copy of this
        rank's share of the fp32 weights of the `monitor.update_layers` blocks, which the update
        ratio needs. Under ZeRO that share is 1/world of a block, so nothing holds a full copy."""
        self.grad_norms = torch.stack([squared_norm(map(full_grad, block.parameters()), self.device)
                                       for block in self.model.blocks]).sqrt()
        self.masters = zero0_masters(self.forward)
        self.before = [[own_fp32(p, self.masters).clone() for p in self.model.blocks[i].parameters()]
                       for i in self.update_blocks]

    def _gradient_metrics(self):
        """Per block: gradient norm, and |dW| / |W| of the update blocks from this rank's shares,
        summed over the ranks in one all-reduce (a replicated share scales both norms alike)."""
        metrics = [{} for _ in self.model.blocks]
        if self.grad_norms is None:
            return metrics
        for m, g in zip(metrics, self.grad_norms):
            m["grad_norm"] = g
        sums = torch.stack([torch.stack([
            squared_norm((own_fp32(p, self.masters) - b for p, b in zip(self.model.blocks[i].parameters(), before)), self.device),
            squared_norm(before, self.device)]) for i, before in zip(self.update_blocks, self.before)])
        update, weight = sum_over_ranks(sums).unbind(-1)
        for i, ratio in zip(self.update_blocks, (update / weight.clamp_min(1e-60)).sqrt()):
            metrics[i]["update_ratio"] = ratio
        self.grad_norms = self.before = self.masters = None
        return metrics

    # ---- the probe --------------------------------------------------------------------------

    def _probe(self):
        return measure_layers(self.forward, self.model, self.probe, self.heads)

    def _layer_scalars(self, layers, step):
        """`layers/<metric>/layer_NNNN` for every layer of a model up to MAX_LAYER_SCALARS layers deep;
        deeper, `layers/<metric>/{min,median,max}` over the layers."""
        by_metric = {}
        for layer in layers:
            for metric, value in layer.items():
                if metric != "layer":
                    by_metric.setdefault(metric, []).append(sum(value) / len(value) if isinstance(value, list) else value)
        for metric, values in by_metric.items():
            if len(layers) <= MAX_LAYER_SCALARS:
                for layer, value in zip(layers, values):
                    self.log.tb.add_scalar(f"layers/{metric}/layer_{layer['layer']:04d}", value, step)
            else:
                ordered = sorted(values)
                for name, value in (("min", ordered[0]), ("median", ordered[len(ordered) // 2]), ("max", ordered[-1])):
                    self.log.tb.add_scalar(f"layers/{metric}/{name}", value, step)

    def record(self, step):
        """Measure every layer now; rank 0 writes and warns. Returns the deepest layer's cosine."""
        layers = read_once([{**m, **g} for m, g in zip(self._probe(), self._gradient_metrics())])
        self.deepest_cos = layers[-1]["cos_sim"]
        if not self.log.enabled:
            return self.deepest_cos
        record = {"step": step, "layers": significant(layers)}
        self.history.append(record)
        append_jsonl(self.path, record)
        tb = self.log.tb
        tb.add_scalar("collapse/deepest_layer_cos_sim", layers[-1]["cos_sim"], step)
        tb.add_scalar("collapse/lowest_stable_rank", min(layer["stable_rank"] for layer in layers), step)
        tb.add_scalar("collapse/collapsed_layers", sum(map(self.is_collapsed, layers)), step)
        self._layer_scalars(layers, step)
        for layer in layers:
            if self.is_collapsed(layer) and layer["layer"] not in self.warned:
                self.warned.add(layer["layer"])
                self.log.info(f"warning: layer {layer['layer']} collapsed at step {step} (cos_sim {layer['cos_sim']:.3f}, "
                              f"stable rank {layer['stable_rank']:.2f}): its tokens are growing alike")
        n = len(self.history)
        if n != 2 and n % HEATMAP_EVERY:
            return self.deepest_cos
        from monitors.plot import heatmap_figure

        for metric in HEATMAP_METRICS:
            figure = heatmap_figure(self.history, metric, title=f"{metric} at step {step}")
            if figure is not None:
                tb.add_figure(f"collapse_heatmap/{metric}", figure, step)  # closes the figure
        return self.deepest_cos
