"""Data pipeline: every input kind, both tokenizers, byte-identical output, the global sample
order across ranks and resumes, and one clear error for each bad input."""

import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest

import data.prepare
from data.loader import SampleOrder
from data.meta import DataError, read_prepared
from data.prepare import load_documents, prepare
from tests.conftest import run_cli

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def documents():
    return [p.read_text(errors="replace") for p in sorted((STDLIB / "json").glob("*.py")) + sorted((STDLIB / "email").glob("*.py"))]


@pytest.fixture(scope="module")
def sources(documents, tmp_path_factory):
    """The same documents as a folder of text files, a JSONL file, a Parquet file and a saved dataset."""
    import datasets

    root = tmp_path_factory.mktemp("sources")
    (root / "txt").mkdir()
    for i, d in enumerate(documents):
        (root / "txt" / f"doc{i:03d}.txt").write_text(d)
    with open(root / "docs.jsonl", "w") as f:
        for d in documents:
            f.write(json.dumps({"id": 1, "content": d}) + "\n")
    ds = datasets.Dataset.from_dict({"content": documents, "id": list(range(len(documents)))})
    ds.to_parquet(str(root / "docs.parquet"))
    ds.save_to_disk(str(root / "saved"))
    return root


def leftovers(directory):
    return [p.name for p in Path(directory).iterdir() if ".tmp" in p.name]


@pytest.mark.parametrize("src,column", [("txt", "text"), ("docs.jsonl", "content"), ("docs.parquet", "content"),
                                        ("saved", "content")])
def test_every_input_kind_gives_the_same_tokens(sources, tmp_path, src, column):
    out = tmp_path / "out"
    run_cli("-m", "data.prepare", "--input", str(sources / src), "--output", str(out), "--vocab-size", "400",
            "--text-column", column, "--val-fraction", "0.2", "--workers", "1")
    meta = read_prepared(out)
    reference = prepare(load_documents(str(sources / "txt")), tmp_path / "ref", vocab_size=400, val_fraction=0.2)
    assert meta["splits"] == reference["splits"] and meta["tokenizer"]["hash"] == reference["tokenizer"]["hash"]
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == len(list((sources / "txt").iterdir()))


def assert_same_files(a, b):
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


# a saved dataset is read from its Arrow cache, JSONL as a stream
@pytest.mark.parametrize("tokenizer,src", [("bpe", "saved"), ("sentencepiece", "docs.jsonl")])
def test_prepare_is_byte_identical_and_round_trips(sources, tmp_path, monkeypatch, tokenizer, src):
    from data.tokenizer import tokenizer_from_meta

    monkeypatch.setattr(data.prepare, "CHUNK_BYTES", 20_000)  # a few dozen chunks, several in flight per worker
    outs = []
    for k, workers in enumerate((1, 2)):
        outs.append(tmp_path / f"out{k}")
        prepare(load_documents(str(sources / src), "content"), outs[-1], tokenizer, 600, 0.2, workers)
    assert_same_files(*outs)
    meta = read_prepared(outs[0])
    tok = tokenizer_from_meta(outs[0], meta)
    tokens = np.fromfile(outs[0] / "val_0000.bin", dtype=meta["dtype"])
    first_doc = tokens[: int(np.argmax(tokens == meta["eot_id"]))]
    assert "def " in tok.decode(first_doc) or "import" in tok.decode(first_doc)


def test_hidden_files_are_not_read_and_streaming_output_is_byte_identical_for_any_workers(tmp_path, monkeypatch):
    from data.prepare import input_files
    from data.tokenizer import tokenizer_from_meta

    monkeypatch.setattr(data.prepare, "CHUNK_BYTES", 4_000)
    corpus = tmp_path / "corpus"
    visible = []
    for i in range(60):
        visible.append(corpus / ("sub" if i % 2 else "") / f"doc{i:02d}.txt")
        visible[-1].parent.mkdir(parents=True, exist_ok=True)
        visible[-1].write_text(f"document {i}: " + "".join(f"line {j} of {i}\n" for j in range(40 + i)))
    for hidden in (".git/objects/ab/cdef0123", ".git/HEAD", ".notes.txt", "sub/.cache/x.txt"):
        (corpus / hidden).parent.mkdir(parents=True, exist_ok=True)
        (corpus / hidden).write_text("HIDDEN-SECRET " * 50)
    assert input_files(str(corpus)) == sorted(map(str, visible))
    assert input_files(str(corpus / "**" / "*")) == sorted(map(str, visible))
    outs = []
    for workers in (1, 2):
        outs.append(tmp_path / f"out{workers}")
        prepare(load_documents(str(corpus)), outs[-1], "bpe", 300, 0.2, workers)
    assert_same_files(*outs)
    meta = read_prepared(outs[0])
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == len(visible)
    tok = tokenizer_from_meta(outs[0], meta)
    text = "".join(tok.decode(np.fromfile(outs[0] / f"{split}_0000.bin", dtype=meta["dtype"])) for split in ("train", "val"))
    assert "document 59:" in text and "HIDDEN" not in text


def test_the_tokenizer_learns_from_the_head_of_the_input_only(tmp_path):
    """--tokenizer-sample-bytes bounds what the tokenizer is trained on; every document is still tokenized."""
    from data.tokenizer import tokenizer_from_meta

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):  # documents in file order: 20 of one kind of text, then 20 of another
        word = "abracadabra" if i < 20 else "zyzzyva"
        (corpus / f"{i:02d}.txt").write_text(f"{word} {i} " * 200)
    head_bytes = sum(len((corpus / f"{i:02d}.txt").read_bytes()) for i in range(20))
    run_cli("-m", "data.prepare", "--input", str(corpus), "--output", str(tmp_path / "out"), "--vocab-size", "300",
            "--tokenizer-sample-bytes", str(head_bytes), "--workers", "1")
    meta = read_prepared(tmp_path / "out")
    vocab = tokenizer_from_meta(tmp_path / "out", meta).tok.get_vocab()
    assert any("abracadabra" in token for token in vocab) and not any("zyzz" in token for token in vocab)
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 40


def test_a_corpus_larger_than_the_free_disk_stops_before_writing(sources, tmp_path, monkeypatch, capsys):
    import shutil

    from data.prepare import main

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(SystemExit) as stop:
        main(["--input", str(sources / "txt"), "--output", str(tmp_path / "out"), "--tokenizer", "bytes"])
    errors = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(errors) == 1 and errors[0].startswith("error: output ")
    assert "GB free: free space or choose an --output on a larger disk" in errors[0]
    assert list(tmp_path.iterdir()) == []


def test_every_flag_has_help():
    from data.prepare import argument_parser

    assert all(action.help for action in argument_parser()._actions)


def test_existing_tokenizer_is_reused(sources, tmp_path):
    a = tmp_path / "a"
    prepare(load_documents(str(sources / "txt")), a, "bpe", 400, 0.2)
    b = tmp_path / "b"
    run_cli("-m", "data.prepare", "--input", str(sources / "docs.parquet"), "--text-column", "content",
            "--output", str(b), "--tokenizer", str(a / "tokenizer.json"), "--val-fraction", "0.2")
    assert read_prepared(a)["tokenizer"]["hash"] == read_prepared(b)["tokenizer"]["hash"]


@pytest.mark.parametrize("args,message", [
    (["--input", "/no/such/corpus.txt"], "input '/no/such/corpus.txt' does not exist"),
    (["--input", "EMPTY"], "holds no text"),
    (["--input", "docs.jsonl", "--text-column", "body"], "has no column 'body': pass --text-column, one of ['id', 'content']"),
    (["--input", "txt", "--vocab-size", "100"], "--vocab-size 100 is too small for byte-level BPE: use at least 257"),
    (["--input", "txt", "--output", "FULL"], "already exists and is not empty: choose a new --output"),
    (["--input", "txt", "--tokenizer", "/no/tok.json"], "tokenizer '/no/tok.json' not found"),
])
def test_bad_inputs_exit_2_with_one_line_and_leave_nothing(sources, tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("other data")
    subst = {"EMPTY": str(tmp_path / "empty"), "FULL": str(tmp_path / "full")}
    args = [subst.get(a, str(sources / a) if (sources / a).exists() else a) for a in args]
    if "--output" not in args:
        args += ["--output", str(tmp_path / "out")]
    proc = run_cli("-m", "data.prepare", *args, "--val-fraction", "0.2", check=False)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["x"]


def test_truncated_shard_is_named(tiny_data, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_data, copy)
    shard = copy / "train_0000.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(DataError, match=r"the train shards of .* hold \d+ bytes, meta.json expects \d+ \(truncated\?\)"):
        read_prepared(copy)
    proc = run_cli("train.py", f"data.path={copy}", check=False)
    assert proc.returncode == 2 and "truncated?" in proc.stderr.strip().splitlines()[-1]


# ---- the global sample order ----------------------------------------------------------------


def test_sample_order_is_a_permutation_per_epoch_from_the_seed():
    order = SampleOrder(10, seed=3)
    first, second = order(np.arange(10)), order(np.arange(10, 20))
    assert sorted(first) == list(range(10)) and sorted(second) == list(range(10))
    assert not np.array_equal(first, second)
    assert np.array_equal(SampleOrder(10, seed=3)(np.arange(5, 15)), np.concatenate([first[5:], second[:5]]))
    assert not np.array_equal(SampleOrder(10, seed=4)(np.arange(10)), first)


# ---- byte tokenizer and corpora with too few documents ----------------------------------------


def test_byte_tokenizer_round_trips_any_text(tmp_path):
    from data.tokenizer import ByteTokenizer, load_tokenizer

    text = "def f(x):\n    return 'héllo' + \"→ 字\"\t\x00"
    tok = ByteTokenizer.train(iter(()), 0)
    ids = tok.encode_batch([text])[0]
    assert ids == list(text.encode("utf-8")) and tok.vocab_size == 257 and tok.eot_id == 256
    assert tok.decode(ids + [tok.eot_id]) == text
    tok.save(tmp_path)
    assert isinstance(load_tokenizer(tmp_path / ByteTokenizer.filename), ByteTokenizer)


def test_a_single_file_gets_a_deterministic_validation_split(tmp_path):
    from data.prepare import BlockSplit

    book = "".join(f"chapter {i // 40}, line {i}: " + "the quick brown fox. " * (i % 7 + 1) + "\n" for i in range(4000))
    (tmp_path / "book.txt").write_text(book)
    outs = []
    for k in range(2):
        outs.append(tmp_path / f"out{k}")
        run_cli("-m", "data.prepare", "--input", str(tmp_path / "book.txt"), "--output", str(outs[-1]),
                "--tokenizer", "bytes", "--workers", str(k + 1))
    meta = read_prepared(outs[0])
    assert meta["val_split"] == "blocks" and meta["splits"]["val"]["tokens"] > 0
    assert_same_files(*outs)
    # the val share is the requested one, and train and val pieces together are the whole book
    split = BlockSplit(0.02)
    train, val = split.pieces(book, "train"), split.pieces(book, "val")
    assert sum(map(len, val)) / len(book) == pytest.approx(0.02, rel=0.2)
    pieces = sorted([(book.index(p), p) for p in train + val])
    assert "".join(p for _, p in pieces) == book
    tokens = meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"]
    assert tokens == len(book.encode()) + len(train) + len(val)  # each piece ends with end-of-text


def test_the_final_evaluation_windows_are_one_fixed_sample_spread_over_the_whole_split(tiny_data):
    """train.final_eval_windows: the same windows for every run of a data set, whatever its seed (no
    train.seed reaches them) or world size, one from each equal stretch of the val split."""
    from data.loader import ValBatches, spread_sample

    ids = spread_sample(10_000, 1024)
    assert len(set(ids)) == 1024 and np.array_equal(ids, spread_sample(10_000, 1024))
    stretch = 10_000 / 1024
    assert all(np.floor(i / stretch) == k for k, i in enumerate(ids))  # one per stretch: the whole split is covered
    assert np.array_equal(spread_sample(7, 1024), np.arange(7))  # a small split is taken whole

    def windows(world_size):
        batches = [ValBatches(tiny_data, 16, 4, world_size, rank, "spread:12") for rank in range(world_size)]
        rows = [row for b in batches for x, y, mask in b.batches() for row, m in zip(x, mask) if m]
        return batches[0], sorted(tuple(r.tolist()) for r in rows)

    one, seen = windows(1)
    assert one.num_windows == 12 and seen == windows(2)[1]
    total = one.data.parts[0].num_windows
    picks = one.data.picks[0]
    assert picks[0] < total / 12 and picks[-1] >= total - total / 12


def test_named_window_sets(tiny_data):
    """The three sets every loss is taken over: a prefix, a spread sample, the whole split."""
    from data.loader import TokenShards, ValBatches, window_set

    total = TokenShards(tiny_data, "val", 16).num_windows
    first, spread, whole = (ValBatches(tiny_data, 16, 4, 1, 0, name) for name in ("first:5", "spread:5", "all"))
    assert (first.num_windows, spread.num_windows, whole.num_windows) == (5, 5, total)
    assert list(first.data.picks[0]) == [0, 1, 2, 3, 4] and list(whole.data.picks[0]) == list(range(total))
    assert spread.data.picks[0][-1] >= total - total / 5
    train = ValBatches(tiny_data, 16, 4, 1, 0, "first:4", split="train")
    assert np.array_equal(train.data.windows(np.arange(4)), TokenShards(tiny_data, "train", 16).windows(np.arange(4)))
    for bad in ("first", "spread:0", "some:3", "all:2"):
        with pytest.raises(ValueError, match="write first:N, spread:N or all"):
            window_set(bad)
