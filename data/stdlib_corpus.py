"""The built-in corpus: the Python standard library's own source, prepared once and cached.

Present on every Python install (~1,800 files, ~31 MB of real code). `site-packages` lives inside
the stdlib folder but differs per machine, so it is excluded; a few stdlib files are not valid
UTF-8 and are read with replacement characters.
"""

import sys
import sysconfig
from pathlib import Path

from filelock import FileLock

from data.prepare import prepare

EXCLUDED = {"site-packages", "dist-packages"}


def stdlib_documents():
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = sorted(p for p in root.rglob("*.py") if not EXCLUDED & set(p.relative_to(root).parts))
    return [p.read_text(encoding="utf-8", errors="replace") for p in paths]


def stdlib_dataset(cache_dir, tokenizer, vocab_size):
    """Directory of the prepared stdlib corpus; the first caller prepares it, others wait."""
    cache = Path(cache_dir).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    kind = "bytes" if tokenizer == "bytes" else f"bpe{vocab_size}"
    out = cache / f"stdlib-py{sys.version_info.major}.{sys.version_info.minor}-{kind}"
    with FileLock(str(out) + ".lock"):
        if not (out / "meta.json").is_file():
            print(f"preparing the built-in corpus (Python stdlib) into {out} ...", file=sys.stderr)
            import datasets

            docs = datasets.Dataset.from_dict({"text": stdlib_documents()})
            prepare(docs, out, tokenizer=tokenizer, vocab_size=vocab_size, source="python-stdlib")
    return out
