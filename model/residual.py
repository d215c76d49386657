"""How a branch joins the residual stream: the *residual/norm seam* of the model.

A join is called as join(x, branch) and returns the new stream. Similarity surgery is a
hidden-state transform placed at one of three sites (the block decides where); transforms take the
decoding cache, since surgery's cumulative mean keeps a running sum there.
"""

import torch
import torch.nn as nn

from model.attention import cumulative_mean


class SimilaritySurgery(nn.Module):
    """S(X) = X - tau · C X (Yu & Zhang, arXiv 2312.06182), causal form.

    Removes tau times the running token mean, the component that attention preserves and that
    makes tokens grow alike with depth. The whole-sequence mean would leak future tokens.
    """

    def __init__(self, tau):
        super().__init__()
        self.tau = tau

    def forward(self, x, cache=None):
        running = cache.running(self) if cache is not None else None
        return torch.sub(x, cumulative_mean(x, dim=1, running=running), alpha=self.tau)


class Unchanged(nn.Module):
    """The hidden-state transform of a site without surgery."""

    def forward(self, x, cache=None):
        return x


def branch_gain(value, trainable):
    """A branch gain: a constant, or a one-element parameter that starts at `value` (not weight-decayed;
    one element, not 0-d, since DeepSpeed broadcasts parameters as byte views)."""
    return nn.Parameter(torch.tensor([float(value)])) if trainable else value


class PostNorm(nn.Module):
    """x <- LN(mix(alpha·x + gain·f(x))). Vanilla: alpha = 1; DeepNorm: alpha = (2L)^(1/4)."""

    def __init__(self, d_model, alpha=1.0, gain=1.0, mix=None, branch_init_gain=1.0, trainable_gain=False):
        super().__init__()
        self.alpha, self.gain = alpha, branch_gain(gain, trainable_gain)
        # DeepNorm's beta: init.py scales the branch's W_V, W_O and MLP weights by it
        self.branch_init_gain = branch_init_gain
        self.mix = mix or Unchanged()
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x, branch, cache=None):
        return self.norm(self.mix(self.alpha * x + self.gain * branch(x), cache))


class PreNorm(nn.Module):
    """x <- mix(x + gain·f(LN(x)))."""

    branch_init_gain = 1.0

    def __init__(self, d_model, gain=1.0, mix=None, trainable_gain=False):
        super().__init__()
        self.gain = branch_gain(gain, trainable_gain)
        self.mix = mix or Unchanged()
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x, branch, cache=None):
        return self.mix(x + self.gain * branch(self.norm(x)), cache)


def residual_join(cfg, gain=1.0, mix=None):
    L = cfg.n_layers
    trainable = cfg.attention == "shaped" and cfg.shaped.trainable_branch_gains
    if cfg.norm == "pre":
        return PreNorm(cfg.d_model, gain, mix, trainable)
    if cfg.norm == "deepnorm":  # Wang et al., arXiv 2203.00555, decoder-only constants
        return PostNorm(cfg.d_model, alpha=(2 * L) ** 0.25, gain=gain, mix=mix, branch_init_gain=(8 * L) ** -0.25,
                        trainable_gain=trainable)
    return PostNorm(cfg.d_model, gain=gain, mix=mix, trainable_gain=trainable)


def final_norm(cfg):
    """Pre-norm leaves the stream unnormalized, so the LM head needs a last LN; post-norm does not."""
    return nn.LayerNorm(cfg.d_model) if cfg.norm == "pre" else nn.Identity()


def branch_gains(cfg):
    """(attention, MLP) branch gains. Shaped attention (Noci et al.) scales the residual branches:
    under post-norm LN(lambda x + g f) = LN(x + (g/lambda) f), so one gain per branch is the whole
    knob; the MLP branch is down-weighted as mlp_gain / sqrt(L). He & Hofmann train these gains
    (model.shaped.trainable_branch_gains)."""
    if cfg.attention != "shaped":
        return 1.0, 1.0
    return cfg.shaped.branch_gain, cfg.shaped.mlp_gain / cfg.n_layers**0.5
