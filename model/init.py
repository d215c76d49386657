"""Weight init: a base scheme for every matrix (`model.init`), then each method's own init on top."""

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


@torch.no_grad()
def init_weights(model, cfg):
    # Only matrices: norms, shaped gains and spectral eigenvalues keep their constructors' values.
    # The spectral basis is a matrix too, but its scale is irrelevant: only its Q factor is used.
    for name, p in model.named_parameters():
        if p.dim() == 2:
            base_init_(name, p, cfg.init, cfg.n_layers)
    if model.lm_head.bias is not None:
        model.lm_head.bias.zero_()  # log_unigram is set from the data by the trainer (init_head_bias)
    for block in model.blocks:
        if cfg.qk_init == "xavier":
            # "Mind the Gap" starts W_Q, W_K Xavier-normal: then A is a Markov matrix with a real spectral
            # gap; at std 0.02 A is nearly C and A - C nearly 0, so gap removal would start as an MLP stack
            for w in block.attn.query_key.weight.chunk(2):
                nn.init.xavier_normal_(w)
    for block in model.blocks:
        beta = block.attn_residual.branch_init_gain
        if beta != 1.0:
            for name, p in block.named_parameters():
                if name in DEEPNORM_BRANCH:
                    p.mul_(beta)
        if block.attn.mixer.zero_query_init:
            block.attn.query_key.weight[: cfg.d_model].zero_()
