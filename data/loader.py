"""Memory-mapped token shards read in a global, world-size-independent sample order.

A sample is a window of seq_len + 1 tokens (inputs and shifted targets) starting at a multiple of
seq_len inside one shard. The training order is a permutation of all windows from (seed, epoch).
An optimizer step that starts at global sample n consumes samples [n, n + G) with G the global
batch (n = s·G at step s while G is fixed); micro-step m on data-parallel rank r of W takes the micro
batch at slot m·W + r. So 2 ranks × micro b and 1 rank × accum 2 × micro b see the same samples per
step, and the loader's whole state is n, the number of samples consumed: a resumed run, on any
number of ranks, continues the same sequence with no sample skipped or repeated.

A mixture (data.mix: prepared directories with weights) keeps that state: global sample n goes to a
source by a fixed, exact-share interleaving of n alone (Mixture), and source i's k-th sample is
position k of its own (seed, epoch) permutation, k being how many samples it gave before n, also a
function of n. A source that runs out starts its next epoch while the others go on.
"""

import os
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
    """Sample k -> window id: epoch k // N, position k % N of the (seed, epoch) permutation."""

    def __init__(self, num_windows, seed, stream=0):
        self.num_windows, self.seed, self.stream = num_windows, seed, stream
        self._epoch, self._perm = None, None

    def permutation(self, epoch):
        if epoch != self._epoch:
            self._epoch = epoch
            # stream 0 keeps a single directory's key, so a mixture's first source orders its windows as
            # data.path would; the other sources get permutations of their own
            key = [self.seed, epoch] + ([self.stream] if self.stream else [])
            self._perm = np.random.default_rng(key).permutation(self.num_windows)
        return self._perm

    def __call__(self, samples):
        out = np.empty(len(samples), dtype=np.int64)
        epochs = samples // self.num_windows
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            out[sel] = self.permutation(int(epoch))[samples[sel] % self.num_windows]
        return out


class Mixture:
    """Global sample n -> (source, how many samples that source gave before n), from n alone.

    Source 0 has the share q_0 / Q of the first n samples, rounded: C_0(n) = round(n q_0 / Q); the
    rest, R = n - C_0(n), are shared among the other sources the same way, and so on. Each count
    grows by 0 or 1 per sample, so sample n belongs to the one source whose count grows at n + 1, and
    every prefix holds each source's share to within one sample per source: an exact-share
    interleaving that needs no state. Weights are kept as integers (millionths) so that the
    arithmetic is exact for any sample index."""

    SCALE = 10**6

    def __init__(self, weights):
        total = sum(weights)
        self.shares = np.array([max(1, round(w / total * self.SCALE)) for w in weights], dtype=np.int64)
        self.rest = np.cumsum(self.shares[::-1])[::-1]  # the shares of this source and the ones after it

    def counts(self, samples):
        """[K, len(samples)]: how many of the global samples before each of `samples` every source gave."""
        left = np.asarray(samples, dtype=np.int64)
        out = np.empty((len(self.shares), left.size), dtype=np.int64)
        for i, (share, rest) in enumerate(zip(self.shares[:-1], self.rest[:-1])):
            out[i] = (left * share + rest // 2) // rest
            left = left - out[i]
        out[-1] = left
        return out

    def __call__(self, samples):
        """(source, index within that source) of each global sample."""
        before, after = self.counts(samples), self.counts(np.asarray(samples) + 1)
        source = np.argmax(after > before, axis=0)
        return source, before[source, np.arange(len(source))]


def weighted_sources(data):
    """[(directory, weight)] of a data directory, or of a mixture: a list of {"path", "weight"}."""
    if isinstance(data, (str, os.PathLike)):
        return [(Path(data), 1.0)]
    return [(Path(s["path"]), float(s["weight"])) for s in data]


def to_tensors(windows, device):
    t = torch.from_numpy(windows)
    return t[:, :-1].to(device, non_blocking=True), t[:, 1:].to(device, non_blocking=True)


class TrainBatches:
    """micro_batch_at(first_sample, micro) -> (inputs, targets) of this rank for the step that
    starts at global sample `first_sample`. `data` is a prepared directory or a mixture (see
    weighted_sources)."""

    def __init__(self, data, seq_len, micro_batch, grad_accum, world_size, rank, seed):
        sources = weighted_sources(data)
        self.names = [str(path) for path, _ in sources]
        self.sources = [TokenShards(path, "train", seq_len) for path, _ in sources]
        for path, shards in zip(self.names, self.sources):
            if shards.num_windows == 0:
                raise ValueError(f"{path}: the train split is shorter than one sequence of {seq_len + 1} tokens")
        self.mixture = Mixture([w for _, w in sources])
        self.orders = [SampleOrder(shards.num_windows, seed, i) for i, shards in enumerate(self.sources)]
        self.micro_batch, self.grad_accum, self.world_size, self.rank = micro_batch, grad_accum, world_size, rank
        self.global_batch = micro_batch * grad_accum * world_size

    def sample_ids(self, first_sample, micro):
        slot = micro * self.world_size + self.rank
        start = first_sample + slot * self.micro_batch
        return np.arange(start, start + self.micro_batch, dtype=np.int64)

    def windows(self, samples):
        """Token windows of global samples, each read from its source at its place in that source's order."""
        source, index = self.mixture(samples)
        out = np.empty((len(samples), self.sources[0].seq_len + 1), dtype=np.int64)
        for i in np.unique(source):
            sel = source == i
            out[sel] = self.sources[i].windows(self.orders[i](index[sel]))
        return out

    def micro_batch_at(self, first_sample, micro, device="cpu"):
        return to_tensors(self.windows(self.sample_ids(first_sample, micro)), device)

    def mix_record(self, samples):
        """For metrics.jsonl: how many of the first `samples` global samples each source gave (mixtures only)."""
        if len(self.sources) == 1:
            return {}
        return {"source_samples": dict(zip(self.names, self.mixture.counts([samples])[:, 0].tolist()))}

    def epochs_begun(self, before, after):
        """A line for each source that ran out and began a new epoch between global samples `before` and `after`."""
        counts = self.mixture.counts([before, after])
        lines = []
        for name, shards, (was, now) in zip(self.names, self.sources, counts):
            for epoch in range(was // shards.num_windows + 1, now // shards.num_windows + 1):
                lines.append(f"data: {name} gave all its {shards.num_windows:,} windows; epoch {epoch} of it begins "
                             f"(its sample {epoch * shards.num_windows:,})")
        return lines


# The seed of the spread validation sample: fixed, not train.seed, so that runs with different seeds
# (and depths, methods) are scored on the same windows.
SPREAD_SEED = 20261203


def spread_sample(num_windows, count, seed=SPREAD_SEED):
    """`count` window ids spread over [0, num_windows): one drawn uniformly from each of `count` equal
    stretches, so the sample covers the whole split (all windows if there are no more than count)."""
    if count >= num_windows:
        return np.arange(num_windows, dtype=np.int64)
    edges = np.linspace(0, num_windows, count + 1)
    low, high = np.ceil(edges[:-1]).astype(np.int64), np.ceil(edges[1:]).astype(np.int64)
    return low + np.floor(np.random.default_rng(seed).random(count) * (high - low)).astype(np.int64)


class MixedWindows:
    """Windows of each source's split side by side, as many of each as its weight asks (within what
    it holds; `wanted` None: all of them): window ids 0..num_windows-1 across all of them. Each
    source gives its first windows in file order, or with `spread` a spread_sample of its whole split."""

    def __init__(self, data, split, seq_len, wanted, spread=False):
        sources = weighted_sources(data)
        self.parts = [TokenShards(path, split, seq_len) for path, _ in sources]
        held = [part.num_windows for part in self.parts]
        shares = held if wanted is None else Mixture([w for _, w in sources]).counts([wanted])[:, 0]
        self.counts = np.minimum(shares, held)
        self.picks = [spread_sample(part.num_windows, int(count)) if spread else np.arange(count, dtype=np.int64)
                      for part, count in zip(self.parts, self.counts)]
        self.first = np.concatenate([[0], np.cumsum(self.counts)])
        self.num_windows = int(self.first[-1])

    def windows(self, ids):
        part = np.searchsorted(self.first, ids, side="right") - 1
        out = np.empty((len(ids), self.parts[0].seq_len + 1), dtype=np.int64)
        for i in np.unique(part):
            sel = part == i
            out[sel] = self.parts[i].windows(self.picks[i][ids[sel] - self.first[i]])
        return out


def window_set(name):
    """(count, spread) of a named set of windows of a split:
    "first:N"  the first N windows in file order (the periodic val_loss: cheap, a prefix);
    "spread:N" N windows spread over the whole split with a fixed seed (final_eval_loss: what runs
               are compared by);
    "all"      every window (python -m tools.evaluate)."""
    kind, _, count = name.partition(":")
    if kind == "all" and not count:
        return None, False
    if kind in ("first", "spread") and count.isdigit() and int(count) > 0:
        return int(count), kind == "spread"
    raise ValueError(f"window set {name!r}: write first:N, spread:N or all")


class ValBatches:
    """A named set of windows of a split (window_set; of a mixture: each source's, shared by weight),
    dealt round-robin to the ranks: the same sequences whatever the world size, so losses summed
    over the ranks compare across runs."""

    def __init__(self, data, seq_len, micro_batch, world_size, rank, windows, split="val"):
        count, spread = window_set(windows)
        self.name = windows
        self.data = MixedWindows(data, split, seq_len, count, spread)
        self.num_windows = self.data.num_windows
        if self.num_windows == 0:
            raise ValueError(f"{data}: the {split} split is shorter than one sequence of {seq_len + 1} tokens")
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
