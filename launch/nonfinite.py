"""The non-finite guard: a NaN or inf in the loss or the gradients skips that optimizer step
instead of poisoning the weights, names the first layer where it appeared, and stops the run with
a checkpoint of the last good state after train.max_bad_steps bad steps in a row.

One check per step, on one scalar, whoever makes it:
- DeepSpeed's ZeRO-3, bf16 (ZeRO-0) and fp16 wrappers, and ZeRO-1/2 in fp32, find the global gradient
  norm they compute for clipping non-finite and skip the step before the inner optimizer runs.
- ZeRO-1/2 in bf16 would also run DeepSpeed's per-tensor check (`bf16.check_grad_overflow`: two
  `isfinite` per gradient tensor, then a host read; thousands of kernels a step at 1,000 layers) and
  skip nothing on the norm. The trainer turns that check off (launch/deepspeed_config.py) and
  GuardedAdamW, the inner optimizer, checks the same global norm instead (`guard`).
- ZeRO-0 in fp32 hands the bare GuardedAdamW the gradients: it checks one fused norm, agreed over the
  ranks (a non-finite loss makes its gradients non-finite).
Every way reports through the `overflow` attribute the engine reads, so the weights, the optimizer
state and the LR schedule stay those of the last good step; the data moves on, so the offending
batch is skipped.
"""

import math

import torch
import torch.distributed as dist

DIVERGED = 3  # exit code of a run stopped by the guard


class GuardedAdamW(torch.optim.AdamW):
    """AdamW whose step() is skipped, on every rank alike, when a gradient is non-finite. Which check
    it makes is set by `guard` once the engine exists."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.overflow = False
        self.bad_params = []
        self.check = self.own_check
        self.checked = None  # (norm tensor, verdict): one check serves every param group of a step

    def step(self, closure=None):
        self.overflow = bool(self.check()) if self.check else False
        if self.overflow:
            # module parameters themselves only under ZeRO-0 fp32; else flat partitions (named "a gradient")
            self.bad_params = [p for g in self.param_groups for p in g["params"]
                               if p.grad is not None and not torch.isfinite(p.grad).all()]
            return None
        return super().step(closure)

    def own_check(self):
        """ZeRO-0 fp32: one fused norm of this rank's gradients, agreed over the ranks."""
        from deepspeed.accelerator import get_accelerator

        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        checked = [n.reshape(1) for n in torch._foreach_norm(grads)] if grads else []
        # on the accelerator whatever the gradients' device: NCCL reduces only GPU tensors
        device = get_accelerator().current_device_name()
        bad = (~torch.cat(checked).isfinite()).any().float().to(device) if checked else torch.zeros((), device=device)
        if dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bad.item()


def guard(engine, optimizer):
    """Settle who checks each step (module docstring), once the engine exists."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    wrapper = engine.optimizer
    if not isinstance(optimizer, GuardedAdamW) or wrapper is optimizer:
        return  # CPU Adam under offload (DeepSpeed's own check stays on), or the bare ZeRO-0 fp32 optimizer
    optimizer.check = None  # the wrapper checks the norm itself and never calls the inner step on a bad one
    if isinstance(wrapper, DeepSpeedZeroOptimizer) and wrapper.dtype == torch.bfloat16 and not wrapper.check_grad_overflow:
        if not wrapper.compute_grad_norm:
            wrapper.check_grad_overflow = True  # no norm to check (a user's zero_optimization.compute_grad_norm=false)
            return

        def global_norm_check():
            # ZeRO-1/2 call the inner step once per param group, after the norm of all of them, so the
            # norm tensor identifies the step; DeepSpeed marks a non-finite group norm as inf or -1
            norm = wrapper._global_grad_norm
            if optimizer.checked is None or optimizer.checked[0] is not norm:
                optimizer.checked = norm, bool(~torch.isfinite(norm) | (norm < 0))
                wrapper.overflow = wrapper.overflow or optimizer.checked[1]  # what the engine reads
            return optimizer.checked[1]

        optimizer.check = global_norm_check


@torch.no_grad()
def first_nonfinite_layer(model, forward, x):
    """Index of the first block whose output is non-finite on input x (-1: the embeddings), or None."""
    found = []

    def check(i):
        def hook(module, inputs, output):
            if not found and not torch.isfinite(output).all():
                found.append(i)
        return hook

    handles = [b.register_forward_hook(check(i)) for i, b in enumerate(model.blocks)]
    handles.append(model.token_embedding.register_forward_hook(check(-1)))
    was_training = model.training
    model.eval()
    try:
        forward(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return found[0] if found else None


def describe(model, layer, bad_params):
    """One phrase naming where the non-finite values first appeared."""
    if layer is not None:
        return "the embeddings" if layer < 0 else f"the activations of layer {layer}"
    names = {id(p): n for n, p in model.named_parameters()}
    for p in bad_params:
        name = names.get(id(p))
        if name and name.startswith("blocks."):
            return f"the gradients of layer {name.split('.')[1]} ({name})"
        if name:
            return f"the gradient of {name}"
    return "the gradients (ZeRO >= 1 and bf16 keep flat partitions: the layer is not identifiable)"


def agreed_min_layer(layer, device):
    """The lowest non-finite layer over all ranks (each diagnosed its own micro-batch)."""
    value = torch.tensor(float("inf") if layer is None else float(layer), device=device)
    if dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return None if math.isinf(value.item()) else int(value.item())


class FaultInjection:
    """"LAYER:STEP[:COUNT]": the output of block LAYER is multiplied by `factor` during steps
    STEP .. STEP+COUNT-1, to test the guard (train.inject_nonfinite, NaN) and the loss-spike
    rollback (train.inject_spike, 100) end to end."""

    def __init__(self, spec, model, factor):
        layer, first, *count = (int(v) for v in spec.split(":"))
        self.steps = range(first, first + (count[0] if count else 1))
        self.factor = factor
        self.active, self.seen = False, set()
        model.blocks[layer].register_forward_hook(self.hook)

    def begin_step(self, step):
        """A step number seen again after a rollback is not hit again (the fault was in that batch)."""
        self.active = step in self.steps and step not in self.seen
        self.seen.add(step)

    def hook(self, module, inputs, output):
        return output * self.factor if self.active else output
