"""Causal self-attention and its variants: the *attention seam* of the model.

A mixer decides how values are mixed across positions, given per-head q, k, v of shape
[B, H, T, d_head]. Every mixer goes through `scaled_dot_product_attention` (flash, memory-efficient
or math backend) plus O(T·d) corrections built from C, the causal uniform matrix:
C_ij = 1/i for j <= i, so C·V is the cumulative mean of V. No T×T matrix is ever formed.

Cached decoding (model/decode.py) calls the same code with the queries of the new positions only,
the keys and values of every position so far, the new positions' own values, and their cumulative
mean from a running sum, so it computes exactly what the full forward pass computes.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.weights import VALUE_OUTPUT


def cumulative_mean(x, dim=-2, running=None):
    """C·x: the mean of x over positions 1..i at each position i (causal; no future token leaks).

    Summed in at least fp32 so bf16 activations do not lose the running sum over long sequences.
    With `running` (a dict kept by a decoding cache), x holds only the new positions: the sum and
    count of the earlier ones come from it, and it is updated.
    """
    acc = torch.promote_types(x.dtype, torch.float32)
    total = (chunked_cumsum if x.is_cuda else torch.cumsum)(x, dim=dim, dtype=acc)
    shape = [1] * x.dim()
    shape[dim] = x.shape[dim]
    first = 1
    if running is not None:
        if "sum" in running:
            total += running["sum"]
            first += running["count"]
        running["sum"], running["count"] = total.narrow(dim, -1, 1).clone(), first - 1 + x.shape[dim]
    count = torch.arange(first, first + x.shape[dim], device=x.device, dtype=acc).view(shape)
    return total.div_(count).to(x.dtype)


# positions per chunk of chunked_cumsum: the in-chunk matmul costs `CHUNK` multiply-adds per element
CHUNK = 64


def chunked_cumsum(x, dim, dtype, chunk=CHUNK):
    """torch.cumsum along `dim` as two matmuls and no scan: inside each chunk of `chunk` positions a
    lower-triangular matmul, then each chunk's total carried to the later chunks by a strictly
    lower-triangular matmul over chunks. On a GPU a scan over T walks the positions one after another
    (~297 µs on [4, 2048, 1024] on an H100 where the memory traffic allows ~15 µs) and inductor
    cannot compile it over a broadcast input (pytorch issue 180221); matmuls run on the tensor cores
    and compile. The CPU scans fast, so cumulative_mean keeps torch.cumsum there."""
    x = x.movedim(dim, -2).to(dtype)
    T = x.shape[-2]
    chunk = min(chunk, T)
    n = -(-T // chunk)
    blocks = F.pad(x, (0, 0, 0, n * chunk - T)).unflatten(-2, (n, chunk))  # [..., n, chunk, D]
    within = torch.ones(chunk, chunk, dtype=dtype, device=x.device).tril() @ blocks
    carried = torch.ones(n, n, dtype=dtype, device=x.device).tril(-1) @ within[..., -1, :]  # [..., n, D]
    return (within + carried.unsqueeze(-2)).flatten(-3, -2)[..., :T, :].movedim(-2, dim)


def attend(q, k, v, scale=None):
    """Causal SDPA. In training q and k cover the same positions (is_causal, any fused kernel); in
    cached decoding the queries are the last positions of the keys (mask aligned bottom-right)."""
    Tq, Tk = q.shape[-2], k.shape[-2]
    if Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def causal_softmax(q, k, scale):
    """The explicit [.., T, T] causal attention probabilities: for monitors and tests, never training."""
    T = q.shape[-2]
    logits = (q @ k.transpose(-1, -2)) * scale
    mask = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    return torch.softmax(logits.masked_fill(mask, float("-inf")), dim=-1)


def causal_uniform(T, device=None, dtype=None):
    """C as an explicit matrix: C_ij = 1/i for j <= i (for monitors and tests)."""
    return torch.ones(T, T, device=device, dtype=dtype).tril() / torch.arange(1, T + 1, device=device, dtype=dtype)[:, None]


class SoftmaxMixer(nn.Module):
    """Vanilla causal softmax attention: softmax(q k^T / sqrt(d_head) + M) v."""

    zero_query_init = False

    def __init__(self, cfg):
        super().__init__()

    def forward(self, q, k, v, own_v=None, mean_v=None):
        """q: new positions; k, v: all positions so far; own_v: the new positions' values;
        mean_v(): their cumulative mean. Both default to the training case (q covers all of k, v)."""
        return attend(q, k, v)

    def attention_matrices(self, q, k, heads=slice(None)):
        """(softmax probabilities P, the effective mixing matrix A with out = A v), explicit T×T, for
        q and k of the given heads (an index into the model's heads)."""
        p = causal_softmax(q, k, q.shape[-1] ** -0.5)
        return p, p


class GapFreeMixer(SoftmaxMixer):
    """Spectral-gap removal, "Mind the Gap" (Naderi et al., arXiv 2410.07799): (A - C) v.

    Subtracting the uniform attention removes the eigenvalue 1 of the Markov matrix A that drives
    rank collapse. Causal consequence: position 1 outputs 0 (its row of A equals its row of C).
    """

    def forward(self, q, k, v, own_v=None, mean_v=None):
        return attend(q, k, v) - (mean_v() if mean_v else cumulative_mean(v))

    def attention_matrices(self, q, k, heads=slice(None)):
        p, _ = super().attention_matrices(q, k)
        return p, p - causal_uniform(q.shape[-2], q.device, p.dtype)


class ShapedMixer(nn.Module):
    """Shaped attention (Noci et al., arXiv 2306.17759): (alpha I + beta softmax(q k^T / tau + M) - gamma C) v.

    Causal form and practice from He & Hofmann (simplified_transformers): per-head alpha, beta,
    gamma initialised to 1, W_Q initialised to 0 so softmax = C and the attention is exactly
    alpha I at init. Temperature (model.shaped.temperature): `head` = tau0 * sqrt(d_head), He &
    Hofmann's causal practice; `width` = tau0 * sqrt(d_model * d_head), the paper's width scaling,
    which at d_model 64 keeps every head's attention at uniform entropy all through training.
    """

    zero_query_init = True

    def __init__(self, cfg):
        super().__init__()
        d_head = cfg.d_model // cfg.n_heads
        width = cfg.d_model if cfg.shaped.temperature == "width" else 1
        self.scale = 1.0 / (cfg.shaped.tau0 * math.sqrt(width * d_head))
        trainable = cfg.shaped.trainable_gains
        self.alpha = nn.Parameter(torch.ones(cfg.n_heads), requires_grad=trainable)
        self.beta = nn.Parameter(torch.ones(cfg.n_heads), requires_grad=trainable)
        self.gamma = nn.Parameter(torch.ones(cfg.n_heads), requires_grad=trainable)

    def forward(self, q, k, v, own_v=None, mean_v=None):
        attended = attend(q, k, v, scale=self.scale)
        own_v = v if own_v is None else own_v
        mean = mean_v() if mean_v else cumulative_mean(v)
        per_head = lambda g: g.view(1, -1, 1, 1)  # noqa: E731
        return per_head(self.alpha) * own_v + per_head(self.beta) * attended - per_head(self.gamma) * mean

    def attention_matrices(self, q, k, heads=slice(None)):
        T = q.shape[-2]
        p = causal_softmax(q, k, self.scale)
        per_head = lambda g: g[heads].view(-1, 1, 1).to(p.dtype)  # noqa: E731
        eye, c = torch.eye(T, device=q.device, dtype=p.dtype), causal_uniform(T, q.device, p.dtype)
        return p, per_head(self.alpha) * eye + per_head(self.beta) * p - per_head(self.gamma) * c


MIXERS = {"softmax": SoftmaxMixer, "gapfree": GapFreeMixer, "shaped": ShapedMixer}


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention; the mixer and the W_V/W_O parameterization are plugged in."""

    def __init__(self, cfg, out_transform):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.query_key = nn.Linear(cfg.d_model, 2 * cfg.d_model, bias=False)
        self.value_output = VALUE_OUTPUT[cfg.weights](cfg)
        self.mixer = MIXERS[cfg.attention](cfg)
        self.out_transform = out_transform

    def queries_keys(self, x):
        """Per-head q, k for input x (what the monitors use to rebuild the attention matrix)."""
        q, k = self.query_key(x).split(x.shape[-1], dim=-1)
        return self.split_heads(q), self.split_heads(k)

    def split_heads(self, x):
        B, T, d = x.shape
        return x.view(B, T, self.n_heads, d // self.n_heads).transpose(1, 2)

    def forward(self, x, cache=None):
        B, T, d = x.shape
        w_value, w_output = self.value_output()
        q, k = self.queries_keys(x)
        v = self.split_heads(F.linear(x, w_value))
        if cache is None:
            y = self.mixer(q, k, v)
        else:
            own_v = v
            k, v = cache.append_keys_values(self, k, v)
            y = self.mixer(q, k, v, own_v, lambda: cumulative_mean(own_v, running=cache.running(self)))
        y = y.transpose(1, 2).reshape(B, T, d)
        return self.out_transform(F.linear(y, w_output), cache)
