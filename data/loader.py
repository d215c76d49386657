"""Memory-mapped token shards read in a global, world-size-independent sample order.

A sample is a window of seq_len + 1 tokens (inputs and shifted targets) starting at a multiple of
seq_len inside one shard. The training order is a permutation of all windows from (seed, epoch).
An optimizer step that starts at global sample n consumes samples [n, n + G) with G the global
batch (n = s·G at step s while G is fixed); micro-step m on data-parallel rank r of W takes the micro
batch at slot m·W + r. So 2 ranks × micro b and 1 rank × accum 2 × micro b see the same samples per
step, and the loader's whole state is n, the number of samples consumed: a resumed run, on any
number of ranks, continues the same sequence with no sample skipped or repeated.
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
    """micro_batch_at(first_sample, micro) -> (inputs, targets) of this rank for the step that
    starts at global sample `first_sample`."""

    def __init__(self, path, seq_len, micro_batch, grad_accum, world_size, rank, seed):
        self.data = TokenShards(path, "train", seq_len)
        if self.data.num_windows == 0:
            raise ValueError(f"{path}: the train split is shorter than one sequence of {seq_len + 1} tokens")
        self.order = SampleOrder(self.data.num_windows, seed)
        self.micro_batch, self.grad_accum, self.world_size, self.rank = micro_batch, grad_accum, world_size, rank
        self.global_batch = micro_batch * grad_accum * world_size

    def sample_ids(self, first_sample, micro):
        slot = micro * self.world_size + self.rank
        start = first_sample + slot * self.micro_batch
        return np.arange(start, start + self.micro_batch, dtype=np.int64)

    def micro_batch_at(self, first_sample, micro, device="cpu"):
        return to_tensors(self.data.windows(self.order(self.sample_ids(first_sample, micro))), device)


class ValBatches:
    """The first eval_batches × micro_batch windows of the val split in file order, dealt
    round-robin to the ranks: the same sequences whatever the world size, so validation losses
    (summed over ranks) compare across runs."""

    def __init__(self, path, seq_len, micro_batch, num_batches, world_size, rank):
        self.data = TokenShards(path, "val", seq_len)
        self.num_windows = min(num_batches * micro_batch, self.data.num_windows)
        if self.num_windows == 0:
            raise ValueError(f"{path}: the val split is shorter than one sequence of {seq_len + 1} tokens")
        self.micro_batch, self.world_size, self.rank = micro_batch, world_size, rank

    def __iter__(self):
        """(window ids, which of them count): every rank runs the same number of batches (ZeRO-3
        gathers parameters collectively in each forward), padding its last one with uncounted rows."""
        per_rank = -(-self.num_windows // self.world_size)
        mine = self.rank + self.world_size * np.arange(per_rank, dtype=np.int64)
        counted = mine < self.num_windows
        ids = np.where(counted, mine, 0)
        for i in range(0, per_rank, self.micro_batch):
            yield ids[i : i + self.micro_batch], counted[i : i + self.micro_batch]

    def batches(self, device="cpu"):
        """(inputs, targets, mask) with mask 1.0 for the rows that count."""
        for ids, counted in self:
            x, y = to_tensors(self.data.windows(ids), device)
            yield x, y, torch.from_numpy(counted.astype(np.float32)).to(device)
