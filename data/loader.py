"""Memory-mapped token shards read in a global, world-size-independent sample order.

A sample is a window of seq_len + 1 tokens (inputs and shifted targets) starting at a multiple of
seq_len inside one shard. The training order is a permutation of all windows from (seed, epoch).
Optimizer step s consumes global samples [s·G, (s+1)·G) with G the global batch; micro-step m on
data-parallel rank r of W takes the micro batch at slot m·W + r. So 2 ranks × micro b and 1 rank ×
accum 2 × micro b see the same samples per step, and the loader's whole state is the step number:
a resumed run, on any number of ranks, continues the same sequence.
"""

from pathlib import Path

import numpy as np
import torch

from data.meta import read_prepared


class TokenShards:
    """The windows of one split of a prepared data directory."""

    def __init__(self, path, split, seq_len):
        path = Path(path)
        self.meta = read_prepared(path)
        info = self.meta["splits"][split]
        self.seq_len = seq_len
        self.shards = [np.memmap(path / name, dtype=self.meta["dtype"], mode="r") for name in info["shards"]]
        counts = np.array([max(0, (len(s) - 1) // seq_len) for s in self.shards], dtype=np.int64)
        self.first_window = np.concatenate([[0], np.cumsum(counts)])
        self.num_windows = int(self.first_window[-1])

    def windows(self, ids):
        """Token windows [len(ids), seq_len + 1] as int64."""
        shard = np.searchsorted(self.first_window, ids, side="right") - 1
        start = (ids - self.first_window[shard]) * self.seq_len
        out = np.empty((len(ids), self.seq_len + 1), dtype=np.int64)
        for row, (s, t) in enumerate(zip(shard, start)):
            out[row] = self.shards[s][t : t + self.seq_len + 1]
        return out


class SampleOrder:
    """Global sample g -> window id: epoch g // N, position g % N of the (seed, epoch) permutation."""

    def __init__(self, num_windows, seed):
        self.num_windows, self.seed = num_windows, seed
        self._epoch, self._perm = None, None

    def permutation(self, epoch):
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
        return self._perm

    def __call__(self, samples):
        out = np.empty(len(samples), dtype=np.int64)
        epochs = samples // self.num_windows
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            out[sel] = self.permutation(int(epoch))[samples[sel] % self.num_windows]
        return out


def to_tensors(windows, device):
    t = torch.from_numpy(windows)
    return t[:, :-1].to(device, non_blocking=True), t[:, 1:].to(device, non_blocking=True)


class TrainBatches:
    """micro_batch(step, micro) -> (inputs, targets) for this rank."""

    def __init__(self, path, seq_len, micro_batch, grad_accum, world_size, rank, seed):
        self.data = TokenShards(path, "train", seq_len)
        if self.data.num_windows == 0:
            raise ValueError(f"{path}: the train split is shorter than one sequence of {seq_len + 1} tokens")
        self.order = SampleOrder(self.data.num_windows, seed)
        self.micro_batch, self.grad_accum, self.world_size, self.rank = micro_batch, grad_accum, world_size, rank
        self.global_batch = micro_batch * grad_accum * world_size

    def sample_ids(self, step, micro):
        slot = micro * self.world_size + self.rank
        start = step * self.global_batch + slot * self.micro_batch
        return np.arange(start, start + self.micro_batch, dtype=np.int64)

    def micro_batch_at(self, step, micro, device="cpu"):
        return to_tensors(self.data.windows(self.order(self.sample_ids(step, micro))), device)


class ValBatches:
    """The first windows of the val split in file order, dealt round-robin to ranks: deterministic."""

    def __init__(self, path, seq_len, micro_batch, num_batches, world_size, rank):
        self.data = TokenShards(path, "val", seq_len)
        per_pass = micro_batch * world_size
        self.num_batches = min(num_batches, self.data.num_windows // per_pass)
        if self.num_batches == 0:
            raise ValueError(f"{path}: the val split holds fewer than {per_pass} sequences of {seq_len + 1} tokens")
        self.micro_batch, self.world_size, self.rank = micro_batch, world_size, rank

    def __iter__(self):
        for k in range(self.num_batches):
            start = (k * self.world_size + self.rank) * self.micro_batch
            yield np.arange(start, start + self.micro_batch, dtype=np.int64)

    def batches(self, device="cpu"):
        for ids in self:
            yield to_tensors(self.data.windows(ids), device)
