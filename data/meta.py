"""meta.json of a prepared data directory: written by data.prepare, checked before training.

Checking costs a few stat() calls, so train.py does it before any process group or GPU is set up:
a missing, truncated or foreign shard stops the run with one line naming the file and the fix.
"""

import hashlib
import json
from pathlib import Path

FORMAT = 1


class DataError(ValueError):
    """Bad data input, named with the fix."""


def file_sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class MetaFile:
    def __init__(self, data):
        self.data = data

    @classmethod
    def new(cls, source, tok, directory, dtype, val_split="documents"):
        return cls({
            "format": FORMAT,
            "source": source,
            "val_split": val_split,
            "tokenizer": {"kind": tok.kind, "file": tok.filename, "vocab_size": tok.vocab_size,
                          "hash": file_sha256(Path(directory) / tok.filename)},
            "eot_id": tok.eot_id,
            "dtype": dtype,
            "splits": {},
        })

    def add_split(self, split, writer):
        documents = int(writer.counts[self.data["eot_id"]])
        self.data["splits"][split] = {"tokens": int(writer.tokens), "documents": documents, "shards": writer.names}
        if split == "train":
            self.data["unigram_entropy"] = unigram_entropy(writer.counts)
            # what model.head_bias=log_unigram starts the output bias from
            self.data["train_token_counts"] = writer.counts.tolist()

    def check_usable(self, source):
        for split, info in self.data["splits"].items():
            if info["tokens"] < 2:
                raise DataError(f"input {source!r} gives an empty {split} split: add documents or change --val-fraction")

    def write(self, directory):
        (Path(directory) / "meta.json").write_text(json.dumps(self.data, indent=2) + "\n")


def read_prepared(path):
    """meta.json of a prepared directory, after checking that every shard is there and whole."""
    path = Path(path)
    fix = f"re-run `python -m data.prepare --input SRC --output {path}` into a new directory"
    try:
        meta = json.loads((path / "meta.json").read_text())
    except FileNotFoundError:
        raise DataError(f"{path} holds no meta.json: prepare it with `python -m data.prepare --input SRC --output {path}`") from None
    except ValueError:
        raise DataError(f"{path / 'meta.json'} is not valid JSON: {fix}") from None
    if meta.get("format") != FORMAT:
        raise DataError(f"{path / 'meta.json'} has format {meta.get('format')!r}, this Fathom reads {FORMAT}: {fix}")
    names = [meta["tokenizer"]["file"], *(n for info in meta["splits"].values() for n in info["shards"])]
    for name in names:  # meta.json may come from anywhere: its file names must not point elsewhere
        if Path(name).name != name or name in ("", ".", ".."):
            raise DataError(f"{path / 'meta.json'} names the file {name!r} outside {path}: {fix}")
    itemsize = {"uint16": 2, "uint32": 4}[meta["dtype"]]
    tokenizer = path / meta["tokenizer"]["file"]
    if not tokenizer.is_file() or file_sha256(tokenizer) != meta["tokenizer"]["hash"]:
        raise DataError(f"{tokenizer} is missing or does not match meta.json's tokenizer hash: {fix}")
    for split, info in meta["splits"].items():
        size = 0
        for name in info["shards"]:
            shard = path / name
            if not shard.is_file():
                raise DataError(f"shard {shard} is missing: {fix}")
            size += shard.stat().st_size
        if size != info["tokens"] * itemsize:
            raise DataError(f"the {split} shards of {path} hold {size} bytes, meta.json expects "
                            f"{info['tokens'] * itemsize} (truncated?): {fix}")
        check_vocabulary(path, meta, info["shards"], fix)
    return meta


def check_vocabulary(path, meta, shards, fix, sample=1 << 22):
    """Token ids beyond the tokenizer's vocabulary would index past the embedding table on the GPU.
    Reads the first `sample` tokens of each shard: shards written by another tokenizer show there."""
    import numpy as np

    vocab = meta["tokenizer"]["vocab_size"]
    for name in shards:
        head = np.memmap(path / name, dtype=meta["dtype"], mode="r")[:sample]
        if len(head) and int(head.max()) >= vocab:
            raise DataError(f"shard {path / name} holds token id {int(head.max())}, outside the tokenizer's "
                            f"vocabulary of {vocab}: the shards and tokenizer do not belong together; {fix}")


def unigram_entropy(counts):
    """Entropy in nats of token frequencies (counts or probabilities): the loss of a model that ignores context."""
    import numpy as np

    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def train_token_counts(path, meta, chunk=1 << 26):
    """How often each token id occurs in the train split: from meta.json, or counted from the shards
    for directories prepared before meta.json recorded it."""
    import numpy as np

    if "train_token_counts" in meta:
        return np.asarray(meta["train_token_counts"], dtype=np.int64)
    counts = np.zeros(meta["tokenizer"]["vocab_size"], dtype=np.int64)
    for name in meta["splits"]["train"]["shards"]:
        tokens = np.memmap(Path(path) / name, dtype=meta["dtype"], mode="r")
        for start in range(0, len(tokens), chunk):
            counts += np.bincount(tokens[start : start + chunk], minlength=len(counts))
    return counts


def data_fingerprint(meta):
    """What fixes the data order besides train.seed and train.seq_len: the tokenizer and every split's
    tokens and shards (of a mixture: each source's fingerprint and weight). Not the paths, so a moved
    or identically re-prepared directory keeps it."""
    kept = {k: v for k, v in meta.items() if k != "source"}
    if "mix" in meta:
        kept["mix"] = [{k: v for k, v in s.items() if k != "path"} for s in meta["mix"]]
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


def mixture_meta(sources):
    """What train.py reads from meta.json, for a mixture of prepared directories [(path, weight, meta)]
    with one tokenizer: the tokenizer, and the token statistics of the mixture (each source's train
    token frequencies weighted by its share of the samples; a sample has the same length everywhere)."""
    import numpy as np

    total = sum(w for _, w, _ in sources)
    frequencies = sum(w / total * counts / counts.sum() for counts, w in
                      ((train_token_counts(path, meta), w) for path, w, meta in sources))
    tokens = sum(meta["splits"]["train"]["tokens"] for _, _, meta in sources)
    first = sources[0][2]
    return {
        "format": FORMAT,
        "source": " + ".join(f"{w:g} x {path}" for path, w, _ in sources),
        "tokenizer": first["tokenizer"],
        "eot_id": first["eot_id"],
        "dtype": first["dtype"],
        "unigram_entropy": unigram_entropy(frequencies),
        # as if the mixture's tokens had been counted: what model.head_bias=log_unigram starts from
        "train_token_counts": np.rint(frequencies * tokens).astype(np.int64).tolist(),
        "mix": [{"path": str(path), "weight": w, "fingerprint": data_fingerprint(meta)} for path, w, meta in sources],
    }
