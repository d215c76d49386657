"""Per-depth collapse monitors: watch rank collapse coming, layer by layer, while training.

At step 0 and every `monitor.every` steps a fixed probe batch of held-out tokens goes through the
model (no grad, eval mode; forward hooks, so the model code is untouched) and, for every layer
(layer 0 = output of the first block), we record the hidden-state metrics of model/metrics.py
(the same functions as `python -m model.probe`), the entropy of each head's attention rows, and
sigma_2/sigma_1 of each head's effective attention matrix (A - C for gap removal, alpha I + beta P -
gamma C for shaped attention), rebuilt explicitly here, off the training path. On the same steps
the gradient norm of each block and its update-to-weight ratio |dW| / |W| are taken around the
optimizer step through DeepSpeed's safe_get_full_* helpers, so every ZeRO stage gives full values.

Every rank runs the probe (ZeRO-3 gathers parameters collectively); rank 0 writes
`monitors.jsonl`, TensorBoard scalars `collapse/<metric>/layer_NNNN`, a layer × step heatmap
image per metric, and a warning the first time a layer collapses: its cosine similarity reaches
`monitor.collapse_threshold` or its stable rank falls to `monitor.stable_rank_threshold`. Nothing here draws random numbers or changes a value the training
step uses, so the trajectory is the same with monitors on or off.
"""

import json

import torch

from launch.run_dir import RunDir, read_jsonl, rewrite_jsonl

from model.metrics import attention_entropy, collapsed, layer_metrics, sigma_ratio

HEATMAP_METRICS = ("cos_sim", "t_sim", "stable_rank", "rms", "attn_sigma_ratio", "grad_norm", "update_ratio")


def full_grad(p):
    from deepspeed.utils import safe_get_full_grad

    return safe_get_full_grad(p)


def full_param(p):
    from deepspeed.utils import safe_get_full_fp32_param

    full = safe_get_full_fp32_param(p)
    return p.detach() if full is None else full


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
                           [full_param(p).detach().clone() for p in block.parameters()])
                          for block in self.model.blocks]

    def _gradient_metrics(self):
        if self.gradients is None:
            return [{} for _ in self.model.blocks]
        out = []
        for block, (grad_norm, before) in zip(self.model.blocks, self.gradients):
            after = [full_param(p) for p in block.parameters()]
            update = norm_of(a - b for a, b in zip(after, before))
            out.append({"grad_norm": grad_norm, "update_ratio": update / max(norm_of(before), 1e-30)})
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
        record = {"step": step, "layers": layers}
        self.history.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for layer in layers:
            for metric, value in layer.items():
                if metric == "layer":
                    continue
                value = sum(value) / len(value) if isinstance(value, list) else value
                self.log.tb.add_scalar(f"collapse/{metric}/layer_{layer['layer']:04d}", value, step)
            if self.is_collapsed(layer) and layer["layer"] not in self.warned:
                self.warned.add(layer["layer"])
                self.log.info(f"warning: layer {layer['layer']} collapsed at step {step} (cos_sim {layer['cos_sim']:.3f}, "
                              f"stable rank {layer['stable_rank']:.2f}): its tokens are growing alike")
        for metric in HEATMAP_METRICS:
            image = heatmap_image(self.history, metric)
            if image is not None:
                self.log.tb.add_image(f"collapse_heatmap/{metric}", image, step, dataformats="HWC")
        return self.deepest_cos


def metric_grid(history, metric):
    """[layers, monitor steps] array of one metric (NaN where a step lacks it), and the steps."""
    import numpy as np

    steps = [r["step"] for r in history]
    grid = np.full((len(history[0]["layers"]), len(history)), np.nan) if history else np.zeros((0, 0))
    for j, r in enumerate(history):
        for layer in r["layers"]:
            value = layer.get(metric)
            if value is not None:
                grid[layer["layer"], j] = sum(value) / len(value) if isinstance(value, list) else value
    return grid, steps


def heatmap_image(history, metric, cell=4):
    """An RGB uint8 picture of the layer × step grid (layer 0 at the bottom), for TensorBoard."""
    import numpy as np
    from matplotlib import colormaps

    grid, _ = metric_grid(history, metric)
    if grid.size == 0 or np.isnan(grid).all():
        return None
    lo, hi = np.nanmin(grid), np.nanmax(grid)
    scaled = np.nan_to_num((grid - lo) / (hi - lo) if hi > lo else grid * 0)
    rgb = (colormaps["viridis"](scaled[::-1])[..., :3] * 255).astype(np.uint8)
    return rgb.repeat(cell, axis=0).repeat(cell, axis=1)
