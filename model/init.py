"""Weight init: a base scheme for every matrix (`model.init`), then each method's own init on top.

Under ZeRO-3 the model is built inside `deepspeed.zero.Init`, so each parameter is already a
partition here: the trainer passes `gather` (launch/deepspeed_config.py), which gathers one at a
time to be initialized (rank 0's values are kept). That keeps the memory of a model larger than
one rank bounded and the random draws in the same order, and keeps DeepSpeed out of the model.
"""

import contextlib
import math

import torch
import torch.nn as nn

# the projections that write into the residual stream (GPT-2 scales them by 1/sqrt(2L))
RESIDUAL_PROJECTIONS = ("attn.value_output.output.weight", "mlp.down.weight")
# the matrices DeepNorm multiplies by beta (Wang et al.: W_V, W_O and the MLP, not W_Q, W_K)
DEEPNORM_BRANCH = ("attn.value_output.value.weight", "attn.value_output.output.weight", "mlp.up.weight", "mlp.down.weight")


def base_init_(name, p, scheme, n_layers):
    if scheme == "gpt2":
        std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(RESIDUAL_PROJECTIONS) else 0.02
        nn.init.normal_(p, std=std)
    elif scheme == "normal":
        nn.init.normal_(p, std=0.02)
    elif scheme == "fanin":
        nn.init.normal_(p, std=1.0 / math.sqrt(p.shape[1]))
    else:
        nn.init.xavier_normal_(p)


def full_shape(p):
    """A parameter's shape, also when ZeRO-3 holds only a flat partition of it."""
    return getattr(p, "ds_shape", p.shape)


def whole(p):
    """`gather` for parameters that are whole on every rank (everything but ZeRO-3)."""
    return contextlib.nullcontext()


@torch.no_grad()
def init_weights(model, cfg, gather=whole):
    # Only matrices: norms, shaped gains and spectral eigenvalues keep their constructors' values.
    # The spectral basis is a matrix too, but its scale is irrelevant: only its Q factor is used.
    for name, p in model.named_parameters():
        if len(full_shape(p)) == 2:
            with gather(p):
                base_init_(name, p, cfg.init, cfg.n_layers)
    if model.lm_head.bias is not None:
        with gather(model.lm_head.bias):
            model.lm_head.bias.zero_()  # log_unigram is set from the data by the trainer (init_head_bias)
    for block in model.blocks:
        if cfg.qk_init == "xavier":
            # "Mind the Gap" starts W_Q, W_K Xavier-normal: then A is a Markov matrix with a real spectral
            # gap; at std 0.02 A is nearly C and A - C nearly 0, so gap removal would start as an MLP stack
            with gather(block.attn.query_key.weight):
                for w in block.attn.query_key.weight.chunk(2):
                    nn.init.xavier_normal_(w)
    for block in model.blocks:
        beta = block.attn_residual.branch_init_gain
        if beta != 1.0:
            for name, p in block.named_parameters():
                if name in DEEPNORM_BRANCH:
                    with gather(p):
                        p.mul_(beta)
        if block.attn.mixer.zero_query_init:
            with gather(block.attn.query_key.weight):
                block.attn.query_key.weight[: cfg.d_model].zero_()
