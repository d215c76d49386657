"""The tokenizers Fathom trains or loads, behind one small interface.

Every kind travels with the data (saved next to meta.json) and gives the same calls:
encode_batch(texts) -> lists of ids, encode_documents(texts, dtype) -> one flat array with
end-of-text after each text, decode(ids) -> text, vocab_size, eot_id. Trainers take an iterable
of texts.
"""

import io
import itertools
import json
from pathlib import Path

import numpy as np

EOT = "<|endoftext|>"
MIN_VOCAB = 257  # byte-level BPE: 256 byte tokens + the end-of-text token


class TokenizerError(ValueError):
    """A tokenizer that cannot be trained or loaded, named with the fix."""


def end_each(flat, lengths, eot_id):
    """`flat` (the concatenated ids of several texts of the given lengths) with end-of-text after each."""
    return np.insert(flat, np.cumsum(lengths, dtype=np.int64), eot_id)


class BaseTokenizer:
    def encode_documents(self, texts, dtype):
        ids = self.encode_batch(texts)
        lengths = [len(i) for i in ids]
        return end_each(np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=sum(lengths)), lengths,
                        self.eot_id)


class BPETokenizer(BaseTokenizer):
    """Byte-level BPE from `tokenizers` (GPT-2 style): any text round-trips exactly."""

    kind = "bpe"
    filename = "tokenizer.json"

    def __init__(self, tok):
        self.tok = tok
        if tok.token_to_id(EOT) is None:
            tok.add_special_tokens([EOT])
        self.eot_id = tok.token_to_id(EOT)
        self.vocab_size = tok.get_vocab_size()

    @classmethod
    def train(cls, texts, vocab_size):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if vocab_size < MIN_VOCAB:
            raise TokenizerError(f"--vocab-size {vocab_size} is too small for byte-level BPE: use at least {MIN_VOCAB}")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path):
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)))

    def encode_batch(self, texts):
        return [e.ids for e in self.tok.encode_batch(texts)]

    def decode(self, ids):
        return self.tok.decode(list(ids))

    def save(self, directory):
        self.tok.save(str(Path(directory) / self.filename))


class SentencePieceTokenizer(BaseTokenizer):
    """A SentencePiece unigram or BPE model with byte fallback; documents end with its </s>."""

    kind = "sentencepiece"
    filename = "tokenizer.model"

    def __init__(self, model_proto):
        import sentencepiece as spm

        self.proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.eot_id = self.sp.eos_id()
        if self.eot_id < 0:
            raise TokenizerError("the SentencePiece model has no end-of-sentence token: train it with eos_id >= 0")
        self.vocab_size = self.sp.get_piece_size()

    @classmethod
    def train(cls, texts, vocab_size, model_type="unigram", seed=0):
        import sentencepiece as spm

        # The trainer drops "sentences" longer than max_sentence_length, so feed it lines, and keep
        # whitespace and case as they are (code and prose both need them to round-trip).
        def lines():
            for text in texts:
                yield from (line for line in text.splitlines() if line.strip())

        spm.set_random_generator_seed(seed)
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=lines(), model_writer=model, vocab_size=vocab_size, model_type=model_type,
                byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
                split_digits=True, input_sentence_size=2_000_000, shuffle_input_sentence=True,
                allow_whitespace_only_pieces=True, minloglevel=2, num_threads=2,
            )
        except RuntimeError as e:
            raise TokenizerError(f"SentencePiece could not train a {vocab_size}-token model: "
                                 f"{str(e).strip().splitlines()[-1]} (change --vocab-size)") from None
        return cls(model.getvalue())

    @classmethod
    def load(cls, path):
        return cls(Path(path).read_bytes())

    def encode_batch(self, texts):
        return self.sp.encode(list(texts))

    def decode(self, ids):
        return self.sp.decode(list(ids))

    def save(self, directory):
        (Path(directory) / self.filename).write_bytes(self.proto)


class ByteTokenizer(BaseTokenizer):
    """The 256 byte values of UTF-8 plus end-of-text (id 256): nothing is trained.

    A byte-level LM at d_model 64 learns in minutes on a CPU (a 257-entry vocabulary leaves the
    budget to the layers), which is what depth experiments on small machines need. Its file is a
    small JSON marker, so it is hashed, checked and reused like the trained kinds."""

    kind = "bytes"
    filename = "tokenizer.bytes.json"
    eot_id = 256
    vocab_size = 257
    MARKER = {"fathom_tokenizer": "bytes", "eot_id": 256}

    @classmethod
    def train(cls, texts, vocab_size):
        return cls()

    @classmethod
    def load(cls, path):
        if json.loads(Path(path).read_text()) != cls.MARKER:
            raise TokenizerError(f"{path} is not a Fathom byte tokenizer file")
        return cls()

    def encode_batch(self, texts):
        return [list(t.encode("utf-8", "replace")) for t in texts]

    def encode_documents(self, texts, dtype):
        # no Python int per byte: tens of times faster than the generic path
        raw = [t.encode("utf-8", "replace") for t in texts]
        return end_each(np.frombuffer(b"".join(raw), dtype=np.uint8).astype(dtype), [len(r) for r in raw], self.eot_id)

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", "replace")

    def save(self, directory):
        (Path(directory) / self.filename).write_text(json.dumps(self.MARKER) + "\n")


KINDS = {"bpe": BPETokenizer, "sentencepiece": SentencePieceTokenizer, "bytes": ByteTokenizer}


def tokenizer_class(path):
    if path.suffix == ".model":
        return SentencePieceTokenizer
    return ByteTokenizer if path.name.endswith(ByteTokenizer.filename) else BPETokenizer


def load_tokenizer(path):
    """An existing tokenizer file: a `tokenizers` JSON or a SentencePiece .model."""
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"tokenizer {str(path)!r} not found: pass bpe, sentencepiece, bytes or an existing "
                             "tokenizer.json / .model / tokenizer.bytes.json file")
    try:
        return tokenizer_class(path).load(path)
    except TokenizerError:
        raise
    except Exception as e:
        raise TokenizerError(f"tokenizer {str(path)!r} could not be read ({type(e).__name__}): pass a "
                             "`tokenizers` JSON file, a SentencePiece .model or a tokenizer.bytes.json") from None


def tokenizer_from_meta(directory, meta):
    """The tokenizer saved next to a prepared data directory's meta.json."""
    return KINDS[meta["tokenizer"]["kind"]].load(Path(directory) / meta["tokenizer"]["file"])

