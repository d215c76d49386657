"""Per-depth collapse monitors: watch rank collapse coming, layer by layer, while training.

At step 0 and every `monitor.every` steps a fixed probe batch of held-out tokens goes through the
model (no grad, eval mode; forward hooks, so the model code is untouched) and, for every layer
(layer 0 = output of the first block), we record the hidden-state metrics of monitors/metrics.py
(the same functions as `python -m monitors.probe`), the entropy of each head's attention rows, and
sigma_2/sigma_1 of each head's effective attention matrix (A - C for gap removal, alpha I + beta P -
gamma C for shaped attention), rebuilt explicitly here, off the training path. On the same steps
the gradient norm of each block and its update-to-weight ratio |dW| / |W| are taken around the
optimizer step through DeepSpeed's safe_get_full_* helpers, so every ZeRO stage gives full values.
The ratio needs the weights from before the step: only `monitor.update_layers` evenly spaced blocks
are copied, one at a time, to host memory, so a 1,000-layer model never holds a second copy of
itself on the device (the gradient norm needs no copy and covers every block).

Every rank runs the probe (ZeRO-3 gathers parameters collectively); rank 0 writes
`monitors.jsonl.gz` (4 significant digits: more than any plot or table shows), TensorBoard's
run-level summaries first (`collapse/`: the deepest layer's cosine, the lowest stable rank, the
number of collapsed layers), per-layer scalars in a group of their own
(`layers/<metric>/layer_NNNN`, hundreds of cards in a deep model), a labelled layer × step heatmap
figure per metric (`collapse_heatmap/<metric>`), and a warning the first time a layer collapses:
its cosine similarity reaches `monitor.collapse_threshold` or its stable rank falls to
`monitor.stable_rank_threshold`. Nothing here draws random numbers or changes a value the training
step uses, so the trajectory is the same with monitors on or off.
"""

import torch

from launch.run_dir import RunDir, append_jsonl, read_jsonl, rewrite_jsonl
from monitors.metrics import attention_entropy, collapsed, layer_metrics, sigma_ratio

# a heatmap needs two records to be one, and its matplotlib layout costs ~0.4 s a figure (seconds a
# record, most of a short run's start-up): drawn at the second record, then every fifth
HEATMAP_EVERY = 5
HEATMAP_METRICS = ("cos_sim", "t_sim", "stable_rank", "rms", "attn_sigma_ratio", "grad_norm", "update_ratio")


def full_grad(p):
    from deepspeed.utils import safe_get_full_grad

    return safe_get_full_grad(p)


def full_param(p):
    from deepspeed.utils import safe_get_full_fp32_param

    full = safe_get_full_fp32_param(p)
    return p.detach() if full is None else full


def significant(value, digits=4):
    """A number, or lists and dicts of numbers, rounded to `digits` significant digits."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, list):
        return [significant(v, digits) for v in value]
    if isinstance(value, dict):
        return {k: significant(v, digits) for k, v in value.items()}
    return value


def norm_of(tensors):
    return sum(float(t.double().pow(2).sum()) for t in tensors if t is not None) ** 0.5


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
        self.gradients = None
        self.deepest_cos = self.history[-1]["layers"][-1]["cos_sim"] if self.history else None
        n, k = len(model.blocks), cfg.update_layers
        self.update_blocks = set(range(n)) if k == 0 or k >= n else \
            {n - 1} if k == 1 else {round(i * (n - 1) / (k - 1)) for i in range(k)}

    def rewind(self, step):
        """Forget the records after `step`: a resumed (or rolled back) run records them again."""
        if self.log.enabled:
            self.history = read_jsonl(self.path, step) if step else []
            rewrite_jsonl(self.path, self.history)

    def due(self, step):
        return self.every > 0 and step % self.every == 0

    # ---- around the optimizer step ------------------------------------------------------------

    def before_step(self):
        """Called after the last backward of a monitored step, before the optimizer step."""
        self.gradients = [(norm_of(full_grad(p) for p in block.parameters()),
                           [full_param(p).detach().to("cpu", copy=True) for p in block.parameters()]
                           if i in self.update_blocks else None)
                          for i, block in enumerate(self.model.blocks)]

    def _gradient_metrics(self):
        if self.gradients is None:
            return [{} for _ in self.model.blocks]
        out = []
        for block, (grad_norm, before) in zip(self.model.blocks, self.gradients):
            out.append({"grad_norm": grad_norm})
            if before is not None:
                update = norm_of(full_param(p).to("cpu") - b for p, b in zip(block.parameters(), before))
                out[-1]["update_ratio"] = update / max(norm_of(before), 1e-30)
        self.gradients = None
        return out

    # ---- the probe --------------------------------------------------------------------------

    @torch.no_grad()
    def _probe(self):
        hidden, attention = [], []

        def on_block(module, inputs, output):
            hidden.append(output.detach())

        def on_mixer(mixer, inputs):
            q, k, _ = inputs
            p, a = mixer.attention_matrices(q.float(), k.float())
            attention.append({"attn_entropy": attention_entropy(p), "attn_sigma_ratio": sigma_ratio(a)})

        handles = [b.register_forward_hook(on_block) for b in self.model.blocks]
        handles += [b.attn.mixer.register_forward_pre_hook(on_mixer) for b in self.model.blocks]
        was_training = self.model.training
        self.model.eval()
        try:
            self.forward(self.probe)
        finally:
            self.model.train(was_training)
            for h in handles:
                h.remove()
        return [{**m, **a} for m, a in zip(layer_metrics(hidden), attention)]

    def record(self, step):
        """Measure every layer now; rank 0 writes and warns. Returns the deepest layer's cosine."""
        layers = [{**m, **g} for m, g in zip(self._probe(), self._gradient_metrics())]
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
        for layer in layers:
            for metric, value in layer.items():
                if metric == "layer":
                    continue
                value = sum(value) / len(value) if isinstance(value, list) else value
                tb.add_scalar(f"layers/{metric}/layer_{layer['layer']:04d}", value, step)
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
