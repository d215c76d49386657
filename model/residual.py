"""How a branch joins the residual stream: the *residual/norm seam* of the model.

A join is called as join(x, branch) and returns the new stream. Similarity surgery is a
hidden-state transform placed at one of three sites (the block decides where); transforms take the
decoding cache, since surgery's cumulative mean keeps a running sum there.

Every scale on a branch meets here, and they multiply. For a branch f (attention or MLP):

    post, deepnorm:  x <- LN(a·x + m·g·f(x))        pre:  x <- x + m·g·f(LN(x))

- a, the skip weight: DeepNorm's (2L)^(1/4) (Wang et al.), else 1.
- g, the method's branch gain: shaped attention's (Noci et al.; He & Hofmann) branch_gain on the
  attention branch and mlp_gain/sqrt(L) on the MLP branch, trainable; else 1.
- m, the depth multiplier (model.depth_scaling): (L_base/L)^alpha, a constant. alpha = 1 is
  CompleteP (Dey et al., arXiv 2505.01618), alpha = 1/2 depth-muP (Yang et al., arXiv 2310.02244).
  In post-norm LN(x + m f) = LN(x/m + f): the same rule is a skip weighted up by L/L_base (what
  DeepNorm does with (2L)^(1/4) and Keel with a skip scaled by L). m = 1 at L = L_base, so there
  every preset is exactly itself and the lr tuned there carries to depth; DeepNorm's a and beta and
  shaped's 1/sqrt(L) keep their own depth dependence on top (a post-norm branch enters with weight
  m·g/a in all). The optimizer rules that go with m are in model/optimizer_groups.py.
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
    """x <- LN(mix(alpha·x + multiplier·gain·f(x))). Vanilla: alpha = 1; DeepNorm: alpha = (2L)^(1/4).
    Its LayerNorm acts on the stream itself, outside the branch (model/optimizer_groups.py)."""

    stream_norm = True

    def __init__(self, d_model, alpha=1.0, gain=1.0, multiplier=1.0, mix=None, branch_init_gain=1.0,
                 trainable_gain=False):
        super().__init__()
        self.alpha, self.gain, self.multiplier = alpha, branch_gain(gain, trainable_gain), multiplier
        # DeepNorm's beta: init.py scales the branch's W_V, W_O and MLP weights by it
        self.branch_init_gain = branch_init_gain
        self.mix = mix or Unchanged()
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x, branch, cache=None):
        return self.norm(self.mix(self.alpha * x + self.multiplier * self.gain * branch(x), cache))


class PreNorm(nn.Module):
    """x <- mix(x + multiplier·gain·f(LN(x))). Its LayerNorm is the branch's input, inside the branch."""

    branch_init_gain = 1.0
    stream_norm = False

    def __init__(self, d_model, gain=1.0, multiplier=1.0, mix=None, trainable_gain=False):
        super().__init__()
        self.gain, self.multiplier = branch_gain(gain, trainable_gain), multiplier
        self.mix = mix or Unchanged()
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x, branch, cache=None):
        return self.mix(x + self.multiplier * self.gain * branch(self.norm(x)), cache)


def depth_multiplier(cfg):
    """m = (L_base / L)^alpha of model.depth_scaling (1 when it is off, and at L = L_base)."""
    return (cfg.depth_scaling.base_layers / cfg.n_layers) ** cfg.depth_scaling.alpha


def residual_join(cfg, gain=1.0, mix=None):
    L, m = cfg.n_layers, depth_multiplier(cfg)
    trainable = cfg.attention == "shaped" and cfg.shaped.trainable_branch_gains
    if cfg.norm == "pre":
        return PreNorm(cfg.d_model, gain, m, mix, trainable)
    if cfg.norm == "deepnorm":  # Wang et al., arXiv 2203.00555, decoder-only constants
        return PostNorm(cfg.d_model, alpha=(2 * L) ** 0.25, gain=gain, multiplier=m, mix=mix,
                        branch_init_gain=(8 * L) ** -0.25, trainable_gain=trainable)
    return PostNorm(cfg.d_model, gain=gain, multiplier=m, mix=mix, trainable_gain=trainable)


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
