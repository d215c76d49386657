"""Collapse metrics of hidden states X [B, T, d], one number per sequence averaged over the batch.

Shared by `python -m monitors.probe` and the training monitors. Every function returns a tensor on
the input's device and none reads it back: a caller measures every layer first and reads them all
with one device-to-host copy (`read_once`), which at a thousand layers is the difference between
one synchronisation and thousands. Each metric is O(T·d) except the ones that need singular values,
which come from an fp32 block Krylov method (on the smaller Gram matrix for hidden states; no SVD
of a large matrix, no fp64 on the device): at d_model 1,024 and T 2,048 an fp64 SVD per sequence per layer took longer than
the training step it was meant to watch.
"""

import torch

# Block Krylov: KRYLOV_STEPS products with a^T a of a block of KRYLOV_BLOCK vectors, then
# Rayleigh-Ritz on the whole space they span. Attention matrices have clustered singular values
# (sigma_2, sigma_3, ... close together), where plain subspace iteration stalls: 30 iterations of it
# were still 1% off sigma_2 / sigma_1 on a perturbed model; this is ~1e-6 off in a third of the time.
KRYLOV_STEPS = 8
KRYLOV_BLOCK = 4


def top_singular_values(a, k=1):
    """The k largest singular values of each matrix a [..., m, n], in fp32, from a block Krylov space
    of a^T a (never formed). The start is fixed, so the result is deterministic and draws nothing from
    the global RNG. A matrix no wider than the space is done exactly."""
    a = a.float()
    n = a.shape[-1]
    if KRYLOV_STEPS * KRYLOV_BLOCK >= n:
        return torch.linalg.svdvals(a)[..., :k]
    start = torch.randn(n, KRYLOV_BLOCK, generator=torch.Generator().manual_seed(0))
    v = torch.linalg.qr(start).Q.to(a.device).expand(*a.shape[:-2], n, KRYLOV_BLOCK)
    basis = [v]
    for _ in range(KRYLOV_STEPS - 1):
        w = a.mT @ (a @ v)
        space = torch.cat(basis, -1)
        for _ in range(2):  # twice is enough (Gram-Schmidt in fp32 loses orthogonality once)
            w = w - space @ (space.mT @ w)
        v = torch.linalg.qr(w).Q
        basis.append(v)
    # Where a is nearly low-rank (a collapsed layer) the space runs out: w is rounding noise, which
    # Gram-Schmidt cannot make orthogonal to the space, and a basis that is not orthonormal
    # overstates sigma_1 (it read a stable rank of 1.12 for 1.20, and below 1). One QR of the whole
    # basis makes it orthonormal, so Rayleigh-Ritz gives a lower bound again.
    return torch.linalg.svdvals(a @ torch.linalg.qr(torch.cat(basis, -1)).Q)[..., :k]


def gram(x):
    """X X^T or X^T X, whichever is smaller: the same nonzero eigenvalues (the squared singular values)."""
    x = x.float()
    return x @ x.mT if x.shape[-2] <= x.shape[-1] else x.mT @ x


def cos_sim(x):
    """Mean pairwise cosine similarity between the T token vectors of a sequence (pairs i != j).

    All pairs, not only causal ones: every hidden state depends only on its past, so comparing
    any two is legitimate, and rank collapse means all of them align. 1 = all tokens parallel.
    Uses sum_{i!=j} u_i.u_j = |sum_i u_i|^2 - T for unit vectors u: no T×T matrix."""
    u = torch.nn.functional.normalize(x.double(), dim=-1)
    T = x.shape[1]
    return ((u.sum(1).pow(2).sum(-1) - T) / (T * (T - 1))).mean()


def t_sim(x):
    """Similarity ratio T·|mean token|^2 / |X|_F^2 in [0, 1] (Yu & Zhang); 1 = all tokens equal."""
    x = x.double()
    return (x.shape[1] * x.mean(1).pow(2).sum(-1) / x.pow(2).sum((1, 2))).mean()


def stable_ranks(x):
    """{"stable_rank": sum sigma_i^2 / sigma_1^2 = |X|_F^2 / sigma_1^2 (1 = rank collapse),
    "stable_rank4": sum sigma_i^4 / sigma_1^4 = the stable rank of X X^T, the variant "Mind the Gap"
    reports} of each sequence's T×d matrix, from one Gram matrix and its top eigenvalue sigma_1^2."""
    g = gram(x)
    top = top_singular_values(g)[..., 0]
    return {"stable_rank": (g.diagonal(dim1=-2, dim2=-1).sum(-1) / top).mean(),
            "stable_rank4": (g.pow(2).sum((-2, -1)) / top.pow(2)).mean()}


def stable_rank(x):
    return stable_ranks(x)["stable_rank"]


def rms(x):
    return x.double().pow(2).mean().sqrt()


def hidden_state_metrics(x):
    """Every hidden-state metric of one layer's output [B, T, d], as tensors."""
    return {"cos_sim": cos_sim(x), "t_sim": t_sim(x), **stable_ranks(x), "rms": rms(x)}


def attention_entropy(p):
    """Mean entropy (nats) of the attention rows of each head, P [B, H, T, T] -> [H]."""
    p = p.float()
    return (-(p * p.clamp_min(1e-30).log()).sum(-1)).mean((0, 2))


def sigma_ratio(a):
    """sigma_2 / sigma_1 of each effective attention matrix, averaged over batch and heads. Singular
    values, not eigenvalues: a causal A is triangular, its eigenvalues are just its diagonal."""
    s = top_singular_values(a, k=2)
    return (s[..., 1] / s[..., 0]).mean()


def read_once(records):
    """A list of dicts of tensors as the same dicts of floats (lists of floats for 1-d tensors), read
    from the device in one copy. Anything that is not a tensor passes through."""
    tensors = [v for r in records for v in r.values() if torch.is_tensor(v)]
    if not tensors:
        return records
    values = iter(torch.cat([t.detach().reshape(-1).double().to(tensors[0].device) for t in tensors]).tolist())
    take = lambda t: next(values) if t.dim() == 0 else [next(values) for _ in range(t.numel())]  # noqa: E731
    return [{k: take(v) if torch.is_tensor(v) else v for k, v in r.items()} for r in records]


def collapsed(layer, cos_threshold, stable_rank_threshold):
    """Rank collapse by either criterion. Cosine alone misses tokens that collapse onto one direction
    that is not their mean (cosine stays moderate, stable rank goes to 1); stable rank alone misses
    nothing of that kind but says less about alignment, so both are called."""
    return layer["cos_sim"] >= cos_threshold or layer["stable_rank"] <= stable_rank_threshold


def layer_metrics(hidden_states):
    """[{"layer": i, "cos_sim": ..., ...}] for a list of per-block outputs."""
    return read_once([{"layer": i, **hidden_state_metrics(h)} for i, h in enumerate(hidden_states)])
