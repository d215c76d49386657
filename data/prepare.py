"""Any corpus -> a trained tokenizer, flat token shards and meta.json, in one command.

    python -m data.prepare --input SRC --output DIR [--tokenizer bpe|sentencepiece|bytes|PATH]
                           [--vocab-size N] [--tokenizer-sample-bytes SIZE] [--text-column NAME]
                           [--val-fraction F] [--workers N] [--streaming]

SRC is a file, a folder or a glob of text / JSONL / Parquet files, a `datasets` dataset saved with
`save_to_disk`, or a dataset name for `datasets.load_dataset`. Text files give one document per
file; JSONL and Parquet one per row (`--text-column`); hidden files and folders are skipped.
Documents go to the val split by content hash; a corpus too small for that (a single file) holds
out evenly spaced blocks of each document.

Memory does not grow with the corpus: the tokenizer is trained on the first
--tokenizer-sample-bytes of the input, then one pass reads the documents in order while worker
processes split and tokenize chunks of them, and their tokens go to the shards as they come back,
in input order, so the output is byte-identical for any --workers.
Output (read by data/loader.py):
    DIR/meta.json  DIR/tokenizer.json|tokenizer.model  DIR/train_0000.bin ...  DIR/val_0000.bin ...
Everything is written under a temporary name and renamed when complete, so a crash never leaves
a half-prepared directory that looks done.
"""

import argparse
import collections
import glob
import hashlib
import math
import multiprocessing
import os
import re
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data.meta import DataError, MetaFile
from data.tokenizer import KINDS, TokenizerError, load_tokenizer

SHARD_TOKENS = 1 << 28  # 512 MiB of uint16 per shard: shards are memory-mapped, the size only bounds file count
SPLITS = ("train", "val")
SAMPLE_BYTES = 1 << 30  # default --tokenizer-sample-bytes: ample for a vocabulary's statistics; training time grows with it
CHUNK_BYTES = 1 << 20  # text per unit of work: large enough to amortize sending it to a worker, small enough to bound memory
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


def documents(ds):
    """The non-empty texts of ds, in input order."""
    for rows in ds.iter(batch_size=256):
        yield from (text for text in rows["text"] if text)


def head(ds, limit, progress=None):
    """The first documents of ds holding `limit` bytes of text (all of them when it holds less)."""
    taken = 0
    for text in documents(ds):
        if taken >= limit:
            return
        yield text
        size = len(text.encode("utf-8", "replace"))
        taken += size
        if progress is not None:
            progress.update(size)


def choose_split(ds, val_fraction, source, sample_bytes):
    """The hash split when it gives both splits a document within the tokenizer sample, else the
    block split. A large corpus settles it within its first documents, so this pass costs nothing."""
    counts = [0, 0]
    for text in head(ds, sample_bytes):
        counts[is_validation(text, val_fraction)] += 1
        if all(counts):
            return DocumentSplit(val_fraction)
    if not any(counts):
        raise DataError(f"input {source!r} holds no text: point --input at non-empty documents")
    return BlockSplit(val_fraction)


def input_files(src):
    """The files of a file, folder or glob, sorted. Hidden files and folders (.git, .cache, ...) are
    skipped at every level: a folder walk prunes them, and glob wildcards never match them."""
    if any(c in src for c in "*?["):
        paths = glob.glob(src, recursive=True)
    elif Path(src).is_dir():
        paths = []
        for root, dirs, files in os.walk(src):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            paths += [os.path.join(root, f) for f in files if not f.startswith(".")]
    else:
        paths = [src]
    return [str(p) for p in sorted(map(Path, paths)) if p.is_file()]


def parquet_text_bytes(path, column):
    import pyarrow.parquet as pq

    md = pq.read_metadata(path)
    groups = (md.row_group(i) for i in range(md.num_row_groups))
    return sum(g.column(j).total_uncompressed_size for g in groups for j in range(g.num_columns)
               if g.column(j).path_in_schema == column)


def looks_like_dataset_name(src):
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", src) is not None and not Path(src).suffix


def load_documents(src, text_column="text", streaming=False):
    """A `datasets` dataset with the documents in a "text" column. Local files are always read as a
    stream (a pretraining corpus is not copied into an Arrow cache first), with their size in
    `info.dataset_size`; `streaming` only concerns dataset names."""
    import datasets

    path = Path(src)
    size = None
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
        ds = datasets.load_dataset(builder, data_files=files, split="train", streaming=True, **kwargs)
        size = sum(parquet_text_bytes(f, text_column) if builder == "parquet" else os.path.getsize(f) for f in files)
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
    ds = ds.select_columns([text_column]).rename_column(text_column, "text") if text_column != "text" \
        else ds.select_columns(["text"])
    if size is not None:
        ds.info.dataset_size = size
    return ds


def text_bytes(ds):
    """Bytes of text in ds as far as known without reading it (None when unknown)."""
    import datasets

    return ds.data.nbytes if isinstance(ds, datasets.Dataset) else ds.info.dataset_size


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


def chunks(ds):
    """The documents of ds in input order, grouped into lists of about CHUNK_BYTES characters."""
    chunk, held = [], 0
    for text in documents(ds):
        chunk.append(text)
        held += len(text)
        if held >= CHUNK_BYTES:
            yield chunk
            chunk, held = [], 0
    if chunk:
        yield chunk


class ChunkEncoder:
    """A chunk of documents -> (bytes of text, train ids, val ids), each piece followed by end-of-text."""

    def __init__(self, tok, splitter, dtype):
        self.tok, self.splitter, self.dtype = tok, splitter, dtype

    def __call__(self, docs):
        ids = [self.tok.encode_documents([piece for text in docs for piece in self.splitter.pieces(text, split)],
                                         self.dtype) for split in SPLITS]
        return sum(len(text.encode("utf-8", "replace")) for text in docs), *ids


_worker_encoder = None  # one per worker process, built once by its initializer


def _start_worker(tokenizer_file, splitter, dtype):
    global _worker_encoder
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # a worker is one core: --workers sets the parallelism
    _worker_encoder = ChunkEncoder(load_tokenizer(tokenizer_file), splitter, dtype)


def _encode_in_worker(docs):
    return _worker_encoder(docs)


def encoded_chunks(ds, tok, tokenizer_file, splitter, dtype, workers):
    """ChunkEncoder's output for every chunk of ds, in input order whatever the number of workers.

    The main process reads the input (a file, a stream or a cached dataset alike) and workers split
    and tokenize; at most two chunks per worker are in flight, so memory does not grow with the corpus."""
    if workers == 1:
        yield from map(ChunkEncoder(tok, splitter, dtype), chunks(ds))
        return
    # spawn: the tokenizer library's thread pool (used by training) does not survive a fork
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                               initargs=(str(tokenizer_file), splitter, dtype))
    try:
        pending = collections.deque()
        for chunk in chunks(ds):
            pending.append(pool.submit(_encode_in_worker, chunk))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(cancel_futures=True)


def make_tokenizer(spec, ds, vocab_size, splitter, sample_bytes):
    """A tokenizer trained on the train pieces of the first `sample_bytes` of the input, or loaded."""
    if spec not in KINDS:
        return load_tokenizer(spec)
    size = text_bytes(ds)
    with tqdm(total=min(sample_bytes, size) if size else None, desc="tokenizer sample", unit="B", unit_scale=True,
              disable=None) as progress:
        texts = (piece for text in head(ds, sample_bytes, progress) for piece in splitter.pieces(text, "train"))
        return KINDS[spec].train(texts, vocab_size)


def check_disk_space(ds, tok, directory, dtype, output):
    """Stop before writing shards that would not fit: tokens per byte measured on the first MBs."""
    size = text_bytes(ds)
    if not size:
        return
    sample = list(head(ds, 1 << 22))
    per_byte = len(tok.encode_documents(sample, dtype)) / sum(len(text.encode("utf-8", "replace")) for text in sample)
    need, free = size * per_byte * np.dtype(dtype).itemsize, shutil.disk_usage(directory).free
    if need > free:
        raise DataError(f"output {str(output)!r} needs about {need / 1e9:.1f} GB ({size / 1e9:.1f} GB of text at "
                        f"{per_byte:.2f} tokens per byte, {np.dtype(dtype).itemsize} bytes per token) and its disk has "
                        f"{free / 1e9:.1f} GB free: free space or choose an --output on a larger disk")


def prepare(ds, output, tokenizer="bpe", vocab_size=8192, val_fraction=0.02, workers=1, source="",
            sample_bytes=SAMPLE_BYTES):
    """Tokenize the documents of `ds` (a `datasets` dataset with a "text" column) into `output`."""
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise DataError(f"output {str(output)!r} already exists and is not empty: choose a new --output or remove it")
    if not 0 < val_fraction < 1:
        raise DataError(f"--val-fraction {val_fraction} must be between 0 and 1")
    if workers < 1:
        raise DataError(f"--workers {workers} must be at least 1")
    if sample_bytes < 1:
        raise DataError(f"--tokenizer-sample-bytes {sample_bytes} must be at least 1")
    splitter = choose_split(ds, val_fraction, source, sample_bytes)

    tmp = output.with_name(f".{output.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        tok = make_tokenizer(tokenizer, ds, vocab_size, splitter, sample_bytes)
        tok.save(tmp)
        dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
        check_disk_space(ds, tok, tmp, dtype, output)
        meta = MetaFile.new(source, tok, tmp, np.dtype(dtype).name, splitter.name)
        writers = [ShardWriter(tmp, split, dtype, tok.vocab_size) for split in SPLITS]
        started, done = time.perf_counter(), 0
        with tqdm(total=text_bytes(ds), desc="tokenize", unit="B", unit_scale=True, disable=None) as progress:
            for nbytes, *ids in encoded_chunks(ds, tok, tmp / tok.filename, splitter, dtype, workers):
                for writer, part in zip(writers, ids):
                    writer.write(part)
                progress.update(nbytes)
                done += nbytes
        seconds = time.perf_counter() - started
        print(f"tokenized {done / 1e6:,.1f} MB of text in {seconds:.1f} s = {done / 1e6 / seconds:.2f} MB/s "
              f"({workers} worker{'s' * (workers > 1)})", file=sys.stderr)
        for split, writer in zip(SPLITS, writers):
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


def byte_size(text):
    """A size such as 1G, 256M, 64K or 1000000 (bytes; K, M, G, T are powers of 1024)."""
    match = re.fullmatch(r"(\d+)([KMGT]?)B?", text.strip().upper())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is no size: write e.g. 1G, 256M or 1000000")
    return int(match[1]) * 1024 ** " KMGT".index(match[2] or " ")


def argument_parser():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--input", required=True,
                    help="text file, folder or glob (one document per file), JSONL or Parquet (one per row), a "
                         "folder written by datasets' save_to_disk, or a dataset name for datasets.load_dataset")
    ap.add_argument("--output", required=True, help="new (or empty) directory to write")
    ap.add_argument("--tokenizer", default="bpe",
                    help="bpe or sentencepiece (trained here), bytes (the 256 byte values + end-of-text, nothing "
                         "trained), or a tokenizer.json / .model / tokenizer.bytes.json to reuse")
    ap.add_argument("--vocab-size", type=int, default=8192, help="vocabulary of a trained tokenizer (bpe, sentencepiece)")
    ap.add_argument("--tokenizer-sample-bytes", type=byte_size, default=SAMPLE_BYTES, metavar="SIZE",
                    help="train the tokenizer on the first SIZE bytes of the input (e.g. 256M, 4G); the whole input "
                         "when smaller")
    ap.add_argument("--text-column", default="text", help="column of JSONL/Parquet/dataset inputs")
    ap.add_argument("--val-fraction", type=float, default=0.02,
                    help="share of documents held out (by content hash); with too few documents for that, evenly "
                         "spaced blocks of every document")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                    help="tokenizing processes (1 = in this process); the output is byte-identical for any number")
    ap.add_argument("--streaming", action="store_true",
                    help="for a dataset name: stream it instead of downloading and caching it first (local files "
                         "are always read as a stream)")
    return ap


def main(argv=None):
    args = argument_parser().parse_args(argv)
    # datasets' streaming datasets import torch (seconds, hundreds of MB) when it is installed, only to
    # share an epoch counter with torch DataLoader workers, which data.prepare does not use
    os.environ.setdefault("USE_TORCH", "0")
    try:
        ds = load_documents(args.input, args.text_column, args.streaming)
        meta = prepare(ds, args.output, args.tokenizer, args.vocab_size, args.val_fraction, args.workers, args.input,
                       args.tokenizer_sample_bytes)
    except (DataError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    s = meta["splits"]
    print(f"wrote {args.output}: {s['train']['tokens']:,} train / {s['val']['tokens']:,} val tokens, "
          f"{meta['tokenizer']['kind']} vocab {meta['tokenizer']['vocab_size']}")


if __name__ == "__main__":
    main()
