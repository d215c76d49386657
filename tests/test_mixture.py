"""Weighted mixtures of prepared directories (data.mix): exact shares, the same samples on any number
of ranks, a resume that continues the sequence, sources that run out, and one error line per bad mix."""

import numpy as np
import pytest

from data.loader import TrainBatches
from tests.conftest import STOP, TINY_MODEL, losses, records, run_cli, train


@pytest.fixture(scope="module")
def small_source(tiny_data, tmp_path_factory):
    """A second directory with tiny_data's tokenizer, so small that it runs out within a few steps."""
    root = tmp_path_factory.mktemp("mix")
    (root / "text").mkdir()
    for i in range(6):
        (root / "text" / f"{i}.txt").write_text(f"Source two, note {i}: the quick brown fox.\n")
    run_cli("-m", "data.prepare", "--input", str(root / "text"), "--output", str(root / "small"), "--tokenizer",
            str(tiny_data / "tokenizer.json"), "--val-fraction", "0.3", "--workers", "1")
    return root / "small"


def mix(a, b):
    return [{"path": str(a), "weight": 0.7}, {"path": str(b), "weight": 0.3}]


def mix_override(a, b):
    return "data.mix=[" + ", ".join(f"{{path: {s['path']}, weight: {s['weight']}}}" for s in mix(a, b)) + "]"


def test_shares_follow_the_weights_and_every_sample_comes_from_its_source(tiny_data, small_source):
    batches = TrainBatches(mix(tiny_data, small_source), 16, micro_batch=4, grad_accum=1, world_size=1, rank=0, seed=7)
    n = 10_000
    given = batches.mix_record(n)["source_samples"]
    assert sum(given.values()) == n
    assert abs(given[str(tiny_data)] / n - 0.7) < 0.01 and abs(given[str(small_source)] / n - 0.3) < 0.01
    windows = batches.windows(np.arange(n))
    source, _ = batches.mixture(np.arange(n))
    for i, shards in enumerate(batches.sources):
        own = shards.windows(np.arange(shards.num_windows))
        drawn = windows[source == i]
        assert len(drawn) == given[batches.names[i]]
        # every epoch of a source is a permutation of its windows; the small one starts many epochs
        epochs = [drawn[k : k + shards.num_windows] for k in range(0, len(drawn), shards.num_windows)]
        for epoch in epochs[:-1]:
            assert sorted(map(bytes, epoch)) == sorted(map(bytes, own))
        assert {bytes(w) for w in epochs[-1]} <= {bytes(w) for w in own}
    assert len(batches.epochs_begun(0, n)) == given[str(small_source)] // batches.sources[1].num_windows
    # a mixture of one directory is that directory, sample for sample
    alone = TrainBatches([{"path": str(tiny_data), "weight": 1}], 16, 4, 1, 1, 0, seed=7)
    assert np.array_equal(alone.windows(np.arange(100)), TrainBatches(tiny_data, 16, 4, 1, 1, 0, seed=7).windows(np.arange(100)))


@pytest.mark.parametrize("kind", ["directory", "mixture"])
def test_ranks_split_the_global_batch_and_a_resume_continues_it(tiny_data, small_source, kind):
    data = tiny_data if kind == "directory" else mix(tiny_data, small_source)

    def loader(world, rank, accum):
        return TrainBatches(data, 16, micro_batch=4, grad_accum=accum, world_size=world, rank=rank, seed=7)

    one = loader(1, 0, accum=2)
    r0, r1 = loader(2, 0, accum=1), loader(2, 1, accum=1)
    G = one.global_batch
    assert G == r0.global_batch == 8
    for step in (0, 1, 57, 1000):
        x1 = np.concatenate([one.micro_batch_at(step * G, m)[0].numpy() for m in range(2)])
        a, b = r0.micro_batch_at(step * G, 0)[0].numpy(), r1.micro_batch_at(step * G, 0)[0].numpy()
        assert np.array_equal(np.concatenate([a, b]), x1)  # union of the ranks = the 1-rank step
    # the loader's state is the samples consumed: a fresh loader continues exactly, whatever its world size
    assert np.array_equal(loader(1, 0, 2).micro_batch_at(57 * G, 1)[0], one.micro_batch_at(57 * G, 1)[0])
    x, y = one.micro_batch_at(3 * G, 0)
    assert np.array_equal(x[:, 1:], y[:, :-1])


def test_a_mixture_trains_logs_what_each_source_gave_and_resumes_exactly(tiny_data, small_source, tmp_path):
    override = mix_override(tiny_data, small_source)
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    whole = train("python", straight, "", override)
    first = train("python", cut, "", override, f"train.stop_at_step={STOP}")
    resumed = train("python", cut, "", override)
    assert losses(cut) == losses(straight)
    lines = records(straight)
    for line in lines:
        given = line["source_samples"]
        assert sum(given.values()) == line["samples"] and abs(given[str(small_source)] - 0.3 * line["samples"]) <= 1
    assert [r["source_samples"] for r in records(cut)] == [r["source_samples"] for r in lines]

    def epochs(proc):
        return [line for line in proc.stderr.splitlines() if f"data: {small_source} gave all its" in line]

    # the small source ran out and began new epochs, each logged once, also across the resume
    assert len(epochs(whole)) >= 2 and epochs(first) + epochs(resumed) == epochs(whole)


BAD_MIXES = [
    (["MIX:/no/such/dir"], "data.mix[1].path: /no/such/dir holds no meta.json"),
    (["data.mix=[{path: DATA, weight: 0}]"], "it must be a list of {path: DIR, weight: W} with W > 0"),
    (["MIX:OTHER"], "was tokenized by another tokenizer than"),
    (["MIX:DATA", "data.path=DATA"], "and data.mix are both set"),
]


@pytest.mark.parametrize("args,message", BAD_MIXES)
def test_a_bad_mixture_stops_with_one_line_before_torch(tiny_data, other_data, tmp_path, args, message):
    names = {"DATA": str(tiny_data), "OTHER": str(other_data)}
    for k, v in names.items():
        args = [a.replace(k, v) for a in args]
    args = [mix_override(tiny_data, a[4:]) if a.startswith("MIX:") else a for a in args]
    proc = run_cli("-X", "importtime", "train.py", *TINY_MODEL, f"train.out_dir={tmp_path / 'run'}", *args, check=False)
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    assert proc.returncode == 2 and len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0], errors
    assert "| torch" not in proc.stderr, "torch was imported before the error"
