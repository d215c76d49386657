"""Collapse metrics of hidden states X [B, T, d], one number per sequence averaged over the batch.

Shared by `python -m monitors.probe` and the training monitors. Computed in float64 off the
training path; each is O(T·d) except stable rank (one spectral norm per sequence).
"""

import torch


def cos_sim(x):
    """Mean pairwise cosine similarity between the T token vectors of a sequence (pairs i != j).

    All pairs, not only causal ones: every hidden state depends only on its past, so comparing
    any two is legitimate, and rank collapse means all of them align. 1 = all tokens parallel.
    Uses sum_{i!=j} u_i.u_j = |sum_i u_i|^2 - T for unit vectors u: no T×T matrix."""
    u = torch.nn.functional.normalize(x.double(), dim=-1)
    T = x.shape[1]
    return ((u.sum(1).pow(2).sum(-1) - T) / (T * (T - 1))).mean().item()


def t_sim(x):
    """Similarity ratio T·|mean token|^2 / |X|_F^2 in [0, 1] (Yu & Zhang); 1 = all tokens equal."""
    x = x.double()
    return (x.shape[1] * x.mean(1).pow(2).sum(-1) / x.pow(2).sum((1, 2))).mean().item()


def stable_rank(x):
    """sum sigma_i^2 / sigma_1^2 of each sequence's T×d matrix; 1 = rank collapse."""
    x = x.double()
    return (x.pow(2).sum((1, 2)) / torch.linalg.matrix_norm(x, ord=2).pow(2)).mean().item()


def stable_rank4(x):
    """sum sigma_i^4 / sigma_1^4 = stable rank of X X^T, the variant "Mind the Gap" reports."""
    s = torch.linalg.svdvals(x.double())
    return ((s / s[..., :1]).pow(4).sum(-1)).mean().item()


def rms(x):
    return x.double().pow(2).mean().sqrt().item()


HIDDEN_STATE_METRICS = {"cos_sim": cos_sim, "t_sim": t_sim, "stable_rank": stable_rank, "stable_rank4": stable_rank4,
                        "rms": rms}


def attention_entropy(p):
    """Mean entropy (nats) of the attention rows of each head, P [B, H, T, T] -> list of H floats."""
    p = p.double()
    return (-(p * p.clamp_min(1e-300).log()).sum(-1)).mean((0, 2)).tolist()


def sigma_ratio(a):
    """sigma_2 / sigma_1 of each effective attention matrix, averaged over batch and heads. Singular
    values, not eigenvalues: a causal A is triangular, its eigenvalues are just its diagonal."""
    s = torch.linalg.svdvals(a.double())
    return (s[..., 1] / s[..., 0]).mean().item()


def collapsed(layer, cos_threshold, stable_rank_threshold):
    """Rank collapse by either criterion. Cosine alone misses tokens that collapse onto one direction
    that is not their mean (cosine stays moderate, stable rank goes to 1); stable rank alone misses
    nothing of that kind but says less about alignment, so both are called."""
    return layer["cos_sim"] >= cos_threshold or layer["stable_rank"] <= stable_rank_threshold


def layer_metrics(hidden_states):
    """[{"layer": i, "cos_sim": ..., ...}] for a list of per-block outputs."""
    return [{"layer": i, **{k: f(h) for k, f in HIDDEN_STATE_METRICS.items()}} for i, h in enumerate(hidden_states)]
