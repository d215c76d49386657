"""The optimizer's parameter groups: which parameters decay, and what depth scaling does to each.

Matrices decay (train.weight_decay); norms, biases, gains and spectral eigenvalues do not.

With model.depth_scaling on (alpha > 0 and optimizer_rules), every parameter is either of the
stream or of a branch, and AdamW's hyperparameters of the branch parameters follow the depth
multiplier m = r^(-alpha), r = L / L_base (model/residual.py):

    branch parameters:  lr x r^(alpha - 1)     eps x m     weight decay x r^(1 - alpha)
    stream parameters:  as configured

Why, for Adam (CompleteP, Dey et al., arXiv 2505.01618, Table 1; EleutherAI/nanoGPT-mup, branch
completep): a branch's parameters reach the stream through m, so their gradients are m times
smaller, and an eps fixed across depth would swamp them at depth: eps scales with m. Adam's update
is the same size whatever the gradient's scale, so a branch moves the stream by m·lr per step
summed over L branches; with alpha = 1 that sum is depth-free at a constant lr, and with alpha = 1/2
the lr falls as r^(-1/2) to keep it so. torch's AdamW decays by lr·wd per step, so wd scales as
1/lr's factor and the per-step shrink of a weight stays what it is at L_base. (nanoGPT-mup scales
eps for every parameter and keeps wd across depth; for alpha = 1 the two agree on everything but
eps of the stream parameters.)

What is stream and what is branch follows from where the parameter acts, so it differs by norm:
- stream: the embeddings, the LM head and its bias, pre-norm's final LN, and post-norm's and
  DeepNorm's LNs after each residual add (they normalize the stream itself, so their gradients do
  not carry m);
- branch: everything else in a block: attention and MLP matrices, pre-norm's LNs (the branch's
  input), shaped attention's alpha, beta, gamma and branch gains, the spectral basis and
  eigenvalues. Surgery and gap removal add no parameters.
At L = L_base every rule is the identity: the run is exactly the preset's.

The stack-norm rule (model.depth_scaling.stack_norm_rule, off by default): post-norm's and
DeepNorm's LNs after each residual add train at lr x 1/r. With a small m, block l maps the stream
to about g_l * normalize(x) + b_l, so the 2L affine maps compose: an Adam step moves each gain
and bias by about lr in a direction shared across blocks (they see the same stream), and the
composed map moves by about 2L·lr. Coordinates with larger gains grow geometrically through the
stack and the biases add up along one direction, which collapses the stream's rank at depth.
lr x 1/r keeps the composed step what it is at L_base, whatever alpha is.
"""

import math

from model.init import full_shape


def lr_factor(step, cfg):
    """The lr schedule, a factor on every group's lr: linear warmup, then cosine decay to
    min_lr_ratio at max_steps."""
    t = cfg.train
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def stack_norm_parameters(model):
    """ids of the LayerNorm parameters after each residual add (post-norm, DeepNorm; none in pre-norm)."""
    return {id(p) for block in model.blocks for join in (block.attn_residual, block.mlp_residual)
            if join.stream_norm for p in join.norm.parameters()}


def stream_parameters(model):
    """ids of the parameters that act on the residual stream outside every branch."""
    return {id(p) for name, p in model.named_parameters() if not name.startswith("blocks.")} | stack_norm_parameters(model)


def parameter_groups(model, train):
    """AdamW groups for `model` under the train config: [{"name", "params", "lr", "eps", "weight_decay"}].
    Without depth scaling two groups, decayed matrices then the rest (the order the fp32 master
    weights of a checkpoint are read back in, tools/pretrained.py); with it, stream then branch, each
    split the same way. Empty groups are left out."""
    cfg = model.config.depth_scaling
    trained = [p for p in model.parameters() if p.requires_grad]

    def group(name, params, decay, lr_factor=1.0, eps_factor=1.0, decay_factor=1.0):
        chosen = [p for p in params if (len(full_shape(p)) >= 2) == decay]
        return {"name": name, "params": chosen, "lr": train.lr * lr_factor, "eps": train.adam_eps * eps_factor,
                "weight_decay": train.weight_decay * decay_factor if decay else 0.0}

    if not (cfg.alpha and cfg.optimizer_rules):
        groups = [group("decay", trained, True), group("no_decay", trained, False)]
    else:
        r, alpha = model.config.n_layers / cfg.base_layers, cfg.alpha
        stream_ids = stream_parameters(model)
        stream = [p for p in trained if id(p) in stream_ids]
        branch = [p for p in trained if id(p) not in stream_ids]
        rules = {"lr_factor": r ** (alpha - 1), "eps_factor": r**-alpha}
        if cfg.stack_norm_rule:
            stack_ids = stack_norm_parameters(model)
            stream = [p for p in stream if id(p) not in stack_ids]
            stack = [p for p in trained if id(p) in stack_ids]
        else:
            stack = []
        groups = [group("stream_decay", stream, True), group("stream_no_decay", stream, False),
                  group("stack_norms", stack, False, lr_factor=1 / r),
                  group("branch_decay", branch, True, **rules, decay_factor=r ** (1 - alpha)),
                  group("branch_no_decay", branch, False, **rules)]
    return [g for g in groups if g["params"]]
