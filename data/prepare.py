"""Turn documents into training data: a trained tokenizer, flat token shards and meta.json.

    python -m data.prepare --input SRC --output DIR [--vocab-size N] [--val-fraction F]

SRC is a text file, a folder (every file below it) or a glob. The output directory is written
under a temporary name and renamed when complete, so a crash never leaves a half-prepared
directory that looks done. Layout (see data/loader.py for how it is read):
    DIR/meta.json  DIR/tokenizer.json  DIR/train_0000.bin ...  DIR/val_0000.bin ...
"""

import argparse
import glob
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

EOT = "<|endoftext|>"
SHARD_TOKENS = 1 << 27  # 256 MiB of uint16 per shard: memory-mapped, so the size only bounds file count


class DataError(ValueError):
    """Bad data input, named with the fix."""


def is_validation(document, val_fraction):
    """A document's split depends on its content alone, so it never changes with input order."""
    h = int.from_bytes(hashlib.blake2b(document.encode("utf-8", "replace"), digest_size=8).digest(), "little")
    return h / 2**64 < val_fraction


def train_tokenizer(documents, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(documents, trainer=trainer)
    return tok


def encode(tok, documents, eot_id, dtype, batch=256):
    """Token ids of all documents, each followed by the end-of-text token, as one flat array."""
    parts = []
    for i in range(0, len(documents), batch):
        for enc in tok.encode_batch(documents[i : i + batch]):
            parts.append(np.asarray(enc.ids, dtype=dtype))
            parts.append(np.asarray([eot_id], dtype=dtype))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def write_shards(tokens, directory, split):
    names = []
    for k, start in enumerate(range(0, max(len(tokens), 1), SHARD_TOKENS)):
        name = f"{split}_{k:04d}.bin"
        tokens[start : start + SHARD_TOKENS].tofile(directory / name)
        names.append(name)
    return names


def unigram_entropy(tokens, vocab_size):
    """Entropy in nats of the token frequencies: the loss of a model that ignores context."""
    p = np.bincount(tokens, minlength=vocab_size).astype(np.float64)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log(p)).sum())


def file_sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def prepare(documents, output, vocab_size=8192, val_fraction=0.02, source=""):
    """Tokenize `documents` (a list of strings) into `output`; returns the meta dict."""
    output = Path(output)
    if output.exists():
        raise DataError(f"output directory {str(output)!r} already exists: choose a new --output or remove it")
    documents = [d for d in documents if d]
    if not documents:
        raise DataError(f"input {source!r} holds no text: point --input at non-empty text files")
    val = [d for d in documents if is_validation(d, val_fraction)]
    train = [d for d in documents if not is_validation(d, val_fraction)]
    if not val or not train:  # tiny inputs: still give both splits something
        train, val = documents[:-1] or documents, documents[-1:]

    tmp = output.with_name(output.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        tok = train_tokenizer(train, vocab_size)
        tok.save(str(tmp / "tokenizer.json"))
        eot_id = tok.token_to_id(EOT)
        real_vocab = tok.get_vocab_size()
        dtype = np.uint16 if real_vocab <= 2**16 else np.uint32
        meta = {
            "format": 1,
            "source": source,
            "tokenizer": {"kind": "bpe", "file": "tokenizer.json", "vocab_size": real_vocab,
                          "hash": file_sha256(tmp / "tokenizer.json")},
            "eot_id": eot_id,
            "dtype": np.dtype(dtype).name,
            "splits": {},
        }
        for split, docs in (("train", train), ("val", val)):
            tokens = encode(tok, docs, eot_id, dtype)
            meta["splits"][split] = {"documents": len(docs), "tokens": int(len(tokens)),
                                     "shards": write_shards(tokens, tmp, split)}
            if split == "train":
                meta["unigram_entropy"] = unigram_entropy(tokens, real_vocab)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        tmp.rename(output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def read_text_files(src):
    """Documents from a file, a folder or a glob: one document per file, sorted by path."""
    if any(c in src for c in "*?["):
        paths = sorted(Path(p) for p in glob.glob(src, recursive=True))
    elif Path(src).is_dir():
        paths = sorted(p for p in Path(src).rglob("*") if p.is_file())
    elif Path(src).is_file():
        paths = [Path(src)]
    else:
        raise DataError(f"input {src!r} does not exist: pass a text file, a folder or a glob")
    paths = [p for p in paths if p.is_file()]
    if not paths:
        raise DataError(f"input {src!r} matches no files: check the path or glob")
    return [p.read_text(encoding="utf-8", errors="replace") for p in paths]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", required=True, help="a text file, a folder or a glob")
    ap.add_argument("--output", required=True, help="new directory to write")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--val-fraction", type=float, default=0.02)
    args = ap.parse_args(argv)
    try:
        meta = prepare(read_text_files(args.input), args.output, args.vocab_size, args.val_fraction, source=args.input)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    s = meta["splits"]
    print(f"wrote {args.output}: {s['train']['tokens']:,} train / {s['val']['tokens']:,} val tokens, "
          f"vocab {meta['tokenizer']['vocab_size']}")


if __name__ == "__main__":
    main()
