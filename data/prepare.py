"""Any corpus -> a trained tokenizer, flat token shards and meta.json, in one command.

    python -m data.prepare --input SRC --output DIR [--tokenizer bpe|sentencepiece|bytes|PATH]
                           [--vocab-size N] [--text-column NAME] [--val-fraction F] [--workers N]

SRC is a file, a folder or a glob of text / JSONL / Parquet files, a `datasets` dataset saved with
`save_to_disk`, or a dataset name for `datasets.load_dataset`. Text files give one document per
file; JSONL and Parquet one per row (`--text-column`). Documents go to the val split by content
hash; a corpus too small for that (a single file) holds out evenly spaced blocks of each document.
Output (read by data/loader.py):
    DIR/meta.json  DIR/tokenizer.json|tokenizer.model  DIR/train_0000.bin ...  DIR/val_0000.bin ...
Everything is written under a temporary name and renamed when complete, so a crash never leaves
a half-prepared directory that looks done.
"""

import argparse
import glob
import hashlib
import math
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np

from data.meta import DataError, MetaFile
from data.tokenizer import KINDS, TokenizerError, load_tokenizer

SHARD_TOKENS = 1 << 28  # 512 MiB of uint16 per shard: shards are memory-mapped, the size only bounds file count
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}  # anything else is read as text


def is_validation(document, val_fraction):
    """A document's split depends on its content alone, so it never changes with input order."""
    h = int.from_bytes(hashlib.blake2b(document.encode("utf-8", "replace"), digest_size=8).digest(), "little")
    return h / 2**64 < val_fraction


class DocumentSplit:
    """Whole documents go to val by content hash: the usual split of a corpus with many documents."""

    name = "documents"

    def __init__(self, val_fraction):
        self.val_fraction = val_fraction

    def pieces(self, text, split):
        """The parts of one document that belong to `split`, each to be tokenized as a document."""
        return [text] if text and is_validation(text, self.val_fraction) == (split == "val") else []


def line_start(text, position):
    """The first line start at or after `position` (or the end of the text)."""
    if position <= 0:
        return 0
    newline = text.find("\n", position - 1)
    return len(text) if newline < 0 else newline + 1


class BlockSplit(DocumentSplit):
    """Every document is cut into blocks of about BLOCK characters at line starts, and evenly spaced
    blocks (a val_fraction of them) go to val; a document shorter than 1/val_fraction blocks gives
    val its last val_fraction instead.

    For corpora with too few documents for the hash split (one novel, a few dozen files): both
    splits come from all of each document, so a single file that changes in style along its length
    (a dump of several books) still gets a validation split like its training split."""

    name = "blocks"
    BLOCK = 4096

    def pieces(self, text, split):
        n, f = len(text), self.val_fraction
        bounds = sorted({line_start(text, k * self.BLOCK) for k in range(math.ceil(n / self.BLOCK))} | {n})
        blocks = list(zip(bounds[:-1], bounds[1:]))
        if len(blocks) * f < 1:
            cut = line_start(text, int(n * (1 - f)))
            val = [(cut, n)] if cut < n else []
        else:
            val = [b for i, b in enumerate(blocks) if math.floor((i + 1) * f) > math.floor(i * f)]
        if split == "val":
            return [text[a:b] for a, b in val]
        edges = [0, *(x for block in val for x in block), n]
        return [text[a:b] for a, b in zip(edges[::2], edges[1::2]) if b > a]


def choose_split(ds, val_fraction, source):
    """The hash split when it gives both splits at least one document, else the block split."""
    counts = [0, 0]
    for row in ds:
        if row["text"]:
            counts[is_validation(row["text"], val_fraction)] += 1
    if not any(counts):
        raise DataError(f"input {source!r} holds no text: point --input at non-empty documents")
    return DocumentSplit(val_fraction) if all(counts) else BlockSplit(val_fraction)


def input_files(src):
    if any(c in src for c in "*?["):
        paths = sorted(Path(p) for p in glob.glob(src, recursive=True))
    elif Path(src).is_dir():
        paths = sorted(Path(src).rglob("*"))
    else:
        paths = [Path(src)]
    return [str(p) for p in paths if p.is_file() and not p.name.startswith(".")]


def looks_like_dataset_name(src):
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", src) is not None and not Path(src).suffix


def load_documents(src, text_column="text", streaming=False):
    """A `datasets` Dataset (or IterableDataset when streaming) with the documents in `text_column`."""
    import datasets

    path = Path(src)
    if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
        ds = datasets.load_from_disk(src)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    elif path.exists() or any(c in src for c in "*?["):
        files = input_files(src)
        if not files:
            raise DataError(f"input {src!r} matches no files: check the path or glob")
        builders = {BUILDERS.get(Path(f).suffix, "text") for f in files}
        if len(builders) > 1:
            raise DataError(f"input {src!r} mixes text, JSON and Parquet files: prepare each kind separately")
        builder = builders.pop()
        kwargs = {"sample_by": "document", "encoding_errors": "replace"} if builder == "text" else {}
        ds = datasets.load_dataset(builder, data_files=files, split="train", streaming=streaming, **kwargs)
    elif looks_like_dataset_name(src):
        try:
            ds = datasets.load_dataset(src, split="train", streaming=streaming)
        except Exception as e:
            raise DataError(f"input {src!r} is no local path and could not be loaded as a dataset "
                            f"({type(e).__name__}); offline, save it with save_to_disk and pass that folder") from None
    else:
        raise DataError(f"input {src!r} does not exist: pass a file, a folder, a glob, a saved dataset or a dataset name")
    columns = ds.column_names or list(next(iter(ds)).keys())
    if text_column not in columns:
        raise DataError(f"input {src!r} has no column {text_column!r}: pass --text-column, one of {columns}")
    return ds.select_columns([text_column]).rename_column(text_column, "text") if text_column != "text" \
        else ds.select_columns(["text"])


def text_batches(ds, splitter, split, batch=1000):
    """The non-empty text of one split, in batches of strings."""
    buf = []
    for row in ds:
        for text in splitter.pieces(row["text"] or "", split):
            buf.append(text)
            if len(buf) == batch:
                yield buf
                buf = []
    if buf:
        yield buf


class ShardWriter:
    """Appends token arrays to DIR/{split}_NNNN.bin, starting a new shard every SHARD_TOKENS."""

    def __init__(self, directory, split, dtype, vocab_size):
        self.directory, self.split, self.dtype = Path(directory), split, dtype
        self.names, self.tokens, self.in_shard = [], 0, SHARD_TOKENS
        self.counts = np.zeros(vocab_size, dtype=np.int64)
        self.file = None

    def write(self, ids):
        ids = np.asarray(ids, dtype=self.dtype)
        self.counts += np.bincount(ids, minlength=len(self.counts))
        self.tokens += len(ids)
        while len(ids):
            if self.in_shard == SHARD_TOKENS:
                self.close()
                self.names.append(f"{self.split}_{len(self.names):04d}.bin")
                self.file, self.in_shard = open(self.directory / self.names[-1], "wb"), 0
            take = ids[: SHARD_TOKENS - self.in_shard]
            take.tofile(self.file)
            self.in_shard += len(take)
            ids = ids[len(take):]

    def close(self):
        if self.file:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            self.file = None

    def unigram_entropy(self):
        """Entropy in nats of the token frequencies: the loss of a model that ignores context."""
        p = self.counts[self.counts > 0] / max(1, self.counts.sum())
        return float(-(p * np.log(p)).sum())


def tokenize(ds, tok, splitter, split, workers):
    """Token ids of one split as batches of flat arrays, each document followed by end-of-text."""
    import datasets

    eot = tok.eot_id

    def encode(batch):
        keep = [piece for t in batch["text"] for piece in splitter.pieces(t or "", split)]
        ids = tok.encode_batch(keep)
        return {"ids": [np.concatenate([np.asarray(i, dtype=np.int64), [eot]]) for i in ids]}

    if isinstance(ds, datasets.IterableDataset):
        mapped = ds.map(encode, batched=True, batch_size=500, remove_columns=["text"])
        for row in mapped:
            yield row["ids"]
        return
    mapped = ds.map(encode, batched=True, batch_size=500, remove_columns=["text"], num_proc=workers if workers > 1 else None,
                    desc=f"tokenize {split}", load_from_cache_file=False, keep_in_memory=True)
    mapped = mapped.with_format("numpy")
    for start in range(0, len(mapped), 1000):
        yield np.concatenate(list(mapped[start : start + 1000]["ids"]))


def make_tokenizer(spec, ds, vocab_size, splitter):
    if spec in KINDS:
        return KINDS[spec].train(text_batches(ds, splitter, "train"), vocab_size)
    return load_tokenizer(spec)


def prepare(ds, output, tokenizer="bpe", vocab_size=8192, val_fraction=0.02, workers=1, source=""):
    """Tokenize the documents of `ds` (a `datasets` dataset with a "text" column) into `output`."""
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise DataError(f"output {str(output)!r} already exists and is not empty: choose a new --output or remove it")
    if not 0 < val_fraction < 1:
        raise DataError(f"--val-fraction {val_fraction} must be between 0 and 1")
    splitter = choose_split(ds, val_fraction, source)

    tmp = output.with_name(f".{output.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        tok = make_tokenizer(tokenizer, ds, vocab_size, splitter)
        tok.save(tmp)
        dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
        meta = MetaFile.new(source, tok, tmp, np.dtype(dtype).name, splitter.name)
        for split in ("train", "val"):
            writer = ShardWriter(tmp, split, dtype, tok.vocab_size)
            for ids in tokenize(ds, tok, splitter, split, workers):
                writer.write(ids)
            writer.close()
            meta.add_split(split, writer)
        meta.check_usable(source)
        meta.write(tmp)
        if output.exists():
            output.rmdir()
        tmp.rename(output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta.data


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", required=True, help="file, folder, glob, saved dataset or dataset name")
    ap.add_argument("--output", required=True, help="new (or empty) directory to write")
    ap.add_argument("--tokenizer", default="bpe",
                    help="bpe or sentencepiece (trained here), bytes (the 256 byte values + end-of-text, nothing "
                         "trained), or a tokenizer.json / .model / tokenizer.bytes.json to reuse")
    ap.add_argument("--vocab-size", type=int, default=8192, help="vocabulary of a trained tokenizer (bpe, sentencepiece)")
    ap.add_argument("--text-column", default="text", help="column of JSONL/Parquet/dataset inputs")
    ap.add_argument("--val-fraction", type=float, default=0.02,
                    help="share of documents held out (by content hash); with too few documents for that, the "
                         "last share of every document")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizing processes")
    ap.add_argument("--streaming", action="store_true", help="stream the input instead of caching it as Arrow")
    args = ap.parse_args(argv)
    try:
        ds = load_documents(args.input, args.text_column, args.streaming)
        meta = prepare(ds, args.output, args.tokenizer, args.vocab_size, args.val_fraction, args.workers, args.input)
    except (DataError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    s = meta["splits"]
    print(f"wrote {args.output}: {s['train']['tokens']:,} train / {s['val']['tokens']:,} val tokens, "
          f"{meta['tokenizer']['kind']} vocab {meta['tokenizer']['vocab_size']}")


if __name__ == "__main__":
    main()
