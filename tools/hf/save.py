"""Write the transformers half of an exported folder: its code, config.json and a fast tokenizer.

The folder's code is generated from Fathom's own modules, not kept as a second copy:
modeling_fathom.py and every Fathom module it imports at module level (the model files and
configs/schema.py) are copied flat, with their Fathom imports made relative. The folder declares
torch, transformers and safetensors; a module that imports anything else, at any level, stops the
export (model/ imports only torch and configs, so this holds by construction).
"""

import ast
import dataclasses
import importlib.util
import json
import shutil
import sys
import tempfile
from pathlib import Path

ENTRY = "tools.hf.modeling_fathom"
FATHOM_PACKAGES = {"model", "configs", "tools"}
DECLARED = {"torch", "transformers", "safetensors"}


def _imports(tree):
    """(node, module it names, whether it sits at module level) of every absolute import."""
    top = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node, node.module, id(node) in top
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node, alias.name, id(node) in top


def _package(module):
    return module.split(".")[0]


def _exported_modules():
    """ENTRY and the Fathom modules it needs at import time, transitively: {module: its source}."""
    sources, todo = {}, [ENTRY]
    while todo:
        name = todo.pop()
        if name not in sources:
            sources[name] = Path(importlib.util.find_spec(name).origin).read_text()
            todo += [m for _, m, top in _imports(ast.parse(sources[name])) if top and _package(m) in FATHOM_PACKAGES]
    return sources


def _rewrite(name, source, files):
    """source with its Fathom imports made relative; an import the folder cannot satisfy stops the export."""
    lines = source.splitlines(keepends=True)
    nodes = sorted(_imports(ast.parse(source)), key=lambda n: n[0].lineno, reverse=True)
    for node, module, _ in nodes:
        first = node.lineno - 1
        if module in files:
            if not isinstance(node, ast.ImportFrom):
                raise RuntimeError(f"{name}: write `from {module} import ...` so the exported copy can import it")
            lines[first] = lines[first].replace(f"from {module} import", f"from .{files[module][:-3]} import", 1)
        elif _package(module) not in DECLARED | sys.stdlib_module_names:
            raise RuntimeError(f"{name} imports {module}: the exported folder declares only "
                               f"{sorted(DECLARED)} and the standard library")
    return "".join(lines)


def remote_code():
    """{file name: source} of the folder's code."""
    sources = _exported_modules()
    files = {name: name.rsplit(".", 1)[-1] + ".py" for name in sources}
    if len(set(files.values())) != len(files):
        raise RuntimeError(f"two exported modules would share a file name: {sorted(files)}")
    return {files[name]: _rewrite(name, source, files) for name, source in sources.items()}


def byte_tokenizer():
    """Fathom's bytes tokenizer as a `tokenizers` one: byte b is id b (GPT-2's byte-to-character map
    names it), no merges, end-of-text 256."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from data.tokenizer import EOT

    tok = Tokenizer(models.BPE(vocab={char: b for b, char in bytes_to_unicode().items()}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOT])
    return tok


def backend_tokenizer(path):
    """The `tokenizers` form of a Fathom tokenizer file (a SentencePiece model is converted by transformers)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from data.tokenizer import tokenizer_class

    kind = tokenizer_class(path).kind
    if kind == "bytes":
        return byte_tokenizer()
    if kind == "bpe":
        return Tokenizer.from_file(str(path))
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy2(path, Path(tmp) / "tokenizer.model")
        return PreTrainedTokenizerFast.from_pretrained(tmp).backend_tokenizer


def save_tokenizer(path, max_seq_len, directory):
    """The Fathom tokenizer file as it is, plus tokenizer.json and tokenizer_config.json for AutoTokenizer."""
    from data.tokenizer import load_tokenizer

    path, directory = Path(path), Path(directory)
    eot_id = load_tokenizer(path).eot_id
    backend = backend_tokenizer(path)
    shutil.copy2(path, directory / path.name)
    if path.name != "tokenizer.json":  # a BPE file is already one, and is kept byte for byte
        backend.save(str(directory / "tokenizer.json"))
    # decoding must give back the text exactly, without transformers' space clean-up
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": backend.id_to_token(eot_id),
              "model_max_length": max_seq_len, "clean_up_tokenization_spaces": False}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return eot_id


def save_hf(model_cfg, directory, tokenizer=None):
    """config.json (with auto_map), the code it names and, given Fathom's tokenizer file, the tokenizer
    and generation_config.json (decoding stops at end-of-text). model.safetensors is Fathom's own."""
    from transformers import GenerationConfig

    from tools.hf.configuration_fathom import FathomHFConfig
    from tools.hf.modeling_fathom import FathomForCausalLM

    directory = Path(directory)
    for name, source in remote_code().items():
        (directory / name).write_text(source)
    auto_map = {"AutoConfig": FathomHFConfig, "AutoModelForCausalLM": FathomForCausalLM}
    config = FathomHFConfig(**dataclasses.asdict(model_cfg), architectures=[FathomForCausalLM.__name__],
                            auto_map={k: f"{c.__module__.rsplit('.', 1)[-1]}.{c.__name__}" for k, c in auto_map.items()},
                            dtype="float32")
    if tokenizer is not None:
        config.eos_token_id = save_tokenizer(tokenizer, model_cfg.max_seq_len, directory)
        GenerationConfig(eos_token_id=config.eos_token_id, pad_token_id=config.eos_token_id).save_pretrained(directory)
    config.save_pretrained(directory)
