"""Cached decoding: the per-layer state that makes generating one token cost O(T·d), not a full pass.

Attention keeps its keys and values; every cumulative mean (the C·V of gap removal and shaped
attention, the C·X of similarity surgery) keeps a running sum and count. `model(idx, cache)` then
takes only the new tokens and returns exactly the logits the full forward pass gives there.
"""

import torch


class DecodeCache:
    def __init__(self):
        self.length = 0
        self._keys_values = {}
        self._running = {}

    def append_keys_values(self, module, k, v):
        """All keys and values of `module` so far, the new ones appended ([B, H, T, d_head])."""
        if module in self._keys_values:
            past_k, past_v = self._keys_values[module]
            k, v = torch.cat([past_k, k], dim=-2), torch.cat([past_v, v], dim=-2)
        self._keys_values[module] = k, v
        return k, v

    def running(self, module):
        """The running sum/count dict of the cumulative mean computed by `module`."""
        return self._running.setdefault(module, {})


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
    """Sample max_new_tokens after the prompt idx [B, T] with a DecodeCache."""
    cache = DecodeCache()
    logits = model(idx, cache)[:, -1]
    out = [idx]
    for _ in range(max_new_tokens):
        if temperature == 0:
            token = logits.argmax(-1, keepdim=True)
        else:
            logits = logits.float() / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            token = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
        out.append(token)
        if cache.length >= model.config.max_seq_len:
            break
        logits = model(token, cache)[:, -1]
    return torch.cat(out, dim=1)
