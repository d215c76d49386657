"""The data a config names: data.path, data.mix, or the built-in corpus (prepared on first use), checked.

Shared by train.py and the tools that load a run (monitors.probe, tools.evaluate, tools.export), so
that none of them imports train.py. Reads JSON and file sizes only: a bad data directory stops a
run before any process group or GPU is set up.
"""

from pathlib import Path

from configs import ConfigError


def resolve_data(cfg):
    """The prepared data directory and its checked meta.json; sets model.vocab_size from its tokenizer.
    For data.mix: the first source's directory (it holds the shared tokenizer) and mixture_meta, whose
    "mix" the loader reads."""
    from data.meta import DataError, read_prepared

    if cfg.data.mix:
        path, meta = resolve_mix(cfg.data)
    else:
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


def resolve_mix(data):
    from data.meta import DataError, mixture_meta, read_prepared

    if data.path:
        raise ConfigError(f"data.path={data.path!r} and data.mix are both set: data.mix names every directory, so "
                          "set data.path='' (or drop data.mix)")
    sources = []
    for i, source in enumerate(data.mix):
        path = Path(source["path"]).expanduser()
        try:
            sources.append((path, source["weight"], read_prepared(path)))
        except DataError as e:
            raise ConfigError(f"data.mix[{i}].path: {e}") from None
    first, _, meta = sources[0]
    for path, _, other in sources[1:]:
        if other["tokenizer"]["hash"] != meta["tokenizer"]["hash"]:
            raise ConfigError(f"data.mix: {path} was tokenized by another tokenizer than {first} (a mixture needs one): "
                              f"prepare it again with --tokenizer {first / meta['tokenizer']['file']}")
    return first, mixture_meta(sources)
