"""The data a config names: data.path, or the built-in corpus (prepared on first use), checked.

Shared by train.py and the tools that load a run (model.probe, model.evaluate, model.export), so
that none of them imports train.py. Reads JSON and file sizes only: a bad data directory stops a
run before any process group or GPU is set up.
"""

from pathlib import Path

from configs import ConfigError


def resolve_data(cfg):
    """The prepared data directory and its checked meta.json; sets model.vocab_size from its tokenizer."""
    from data.meta import DataError, read_prepared

    if cfg.data.path:
        path = Path(cfg.data.path).expanduser()
    else:
        from data.stdlib_corpus import stdlib_dataset

        path = stdlib_dataset(cfg.data.cache_dir, cfg.data.tokenizer, cfg.data.vocab_size)
    try:
        meta = read_prepared(path)
    except DataError as e:
        raise ConfigError(f"data.path: {e}") from None
    cfg.model.vocab_size = meta["tokenizer"]["vocab_size"]
    return path, meta
