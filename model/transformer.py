"""A decoder-only Transformer LM, post-norm by default, read top to bottom.

Each rank-collapse fix plugs in at one seam:
  attention variant        -> model/attention.py  (MIXERS: softmax, gapfree, shaped)
  residual / norm scheme   -> model/residual.py   (post, pre, deepnorm; similarity surgery sites)
  weight parameterization  -> model/weights.py    (VALUE_OUTPUT: standard, spectral)
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from configs.schema import ModelConfig
from model.attention import CausalSelfAttention
from model.init import init_weights, whole
from model.residual import (
    SimilaritySurgery,
    Unchanged,
    branch_gains,
    final_norm,
    residual_join,
)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.up = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model, bias=False)
        self.down = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()

        def surgery(site):
            return SimilaritySurgery(cfg.surgery.tau) if cfg.surgery.site == site else Unchanged()

        attn_gain, mlp_gain = branch_gains(cfg)
        self.attn = CausalSelfAttention(cfg, out_transform=surgery("attn_out"))
        self.mlp = MLP(cfg)
        self.attn_residual = residual_join(cfg, attn_gain, mix=surgery("residual"))
        self.mlp_residual = residual_join(cfg, mlp_gain)
        self.block_transform = surgery("block")

    def forward(self, x, cache=None):
        x = self.attn_residual(x, lambda h: self.attn(h, cache), cache)
        x = self.mlp_residual(x, self.mlp)
        return self.block_transform(x, cache)


class Transformer(nn.Module):
    """`Transformer(cfg)(idx)` maps token ids [B, T] to logits [B, T, vocab]."""

    def __init__(self, cfg: ModelConfig, gather=whole):
        super().__init__()
        self.config = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.position_embedding = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.final_norm = final_norm(cfg)
        # A tied head without a bias can emit the unigram distribution (what an LM learns first) only
        # through one vector shared by every final state, which training writes into every layer and
        # post-norm compounds with depth: the bias gives it a place of its own (docs/results_confounds.md).
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=cfg.head_bias != "none")
        if cfg.tie_embeddings:
            self.lm_head.weight = self.token_embedding.weight
        init_weights(self, cfg, gather)

    def forward(self, idx, cache=None):
        """Logits for idx. With a DecodeCache (model/decode.py), idx holds only the positions after
        those the cache has seen, and the result equals the full forward pass at those positions."""
        start = cache.length if cache is not None else 0
        end = start + idx.shape[1]
        if end > self.config.max_seq_len:
            raise ValueError(f"sequence of {end} tokens exceeds model.max_seq_len={self.config.max_seq_len}")
        x = self.token_embedding(idx) + self.position_embedding(torch.arange(start, end, device=idx.device))
        for block in self.blocks:
            x = block(x, cache)
        if cache is not None:
            cache.length = end
        return self.lm_head(self.final_norm(x))

    @torch.no_grad()
    def init_head_bias(self, token_counts, gather=whole):
        """model.head_bias=log_unigram: the output bias starts at the log of the training split's token
        frequencies, so the untrained model already predicts the unigram distribution. Tokens the
        split never holds get half a count (log 0 would be -inf; softmax renormalizes the excess)."""
        counts = torch.as_tensor(token_counts, dtype=torch.float64)
        with gather(self.lm_head.bias):
            self.lm_head.bias.copy_((counts.clamp_min(0.5) / counts.sum()).log())

    def num_parameters(self):
        """All parameters, also when ZeRO-3 holds only a partition of each on this rank."""
        return sum(getattr(p, "ds_numel", p.numel()) for p in self.parameters())
