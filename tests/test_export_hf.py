"""The exported folder under transformers, loaded where Fathom cannot be imported.

A tiny model of every preset is trained a few steps in-process and saved by save_pretrained (the
CLI's code path), one per tokenizer kind in turn; a bf16 run of train.py goes through
tools.export's main. One isolated interpreter (`python -I -S`, cwd outside the checkout) loads them
all with AutoModelForCausalLM / AutoTokenizer and writes what it computed for the comparisons here.
"""

import json
import site
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from configs import load_config
from data.tokenizer import ByteTokenizer, SentencePieceTokenizer, load_tokenizer
from model import Transformer
from model.decode import generate
from tests.conftest import ROOT, TINY_MODEL, run_cli, train_tiny
from tools.export import main as export_main
from tools.pretrained import load_run, save_pretrained

PRESETS = sorted(p.stem for p in (ROOT / "configs" / "methods").glob("*.yaml"))
TEXTS = ["def foo(x):\n    return  x + 1\n", "  héllo wörld 日本 12345\t\n\n", "import os"]
NEW_TOKENS = 12

LOAD = """
import importlib.util, json, sys
sys.path += json.loads(sys.argv.pop(1))
import torch
assert importlib.util.find_spec("model") is None and importlib.util.find_spec("configs") is None, sys.path
from transformers import AutoModelForCausalLM, AutoTokenizer

texts, new_tokens, results = json.loads(sys.argv[1]), int(sys.argv[2]), {}
for folder in sys.argv[3:]:
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = [tokenizer(t)["input_ids"] for t in texts]
    prompt = torch.tensor([ids[0]])
    lengths = []  # what each forward pass of generate() is given
    model.token_embedding.register_forward_hook(lambda module, args, out: lengths.append(args[0].shape[1]))
    cached = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False)
    uncached = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, use_cache=False)
    results[folder] = {"ids": ids, "decoded": [tokenizer.decode(i) for i in ids], "logits": model(prompt).logits,
                       "generated": cached, "uncached": uncached, "lengths": lengths[:cached.shape[1] - prompt.shape[1]]}
torch.save(results, "results.pt")
"""


def tokenizer_files(tiny_data, root):
    """A tokenizer file of each kind: the tiny corpus' BPE, bytes, and SentencePiece trained on model/*.py."""
    (root / "bytes").mkdir()
    ByteTokenizer().save(root / "bytes")
    run_cli("-m", "data.prepare", "--input", str(ROOT / "model" / "*.py"), "--output", str(root / "sp"),
            "--tokenizer", "sentencepiece", "--vocab-size", "512", "--val-fraction", "0.5")
    return [tiny_data / "tokenizer.json", root / "bytes" / ByteTokenizer.filename,
            root / "sp" / SentencePieceTokenizer.filename]


def train_in_process(preset, vocab_size):
    cfg = load_config([f"configs/methods/{preset}.yaml"], [*TINY_MODEL, f"model.vocab_size={vocab_size}"])
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(5):
        idx = torch.randint(0, vocab_size, (4, 33))
        loss = torch.nn.functional.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return cfg, model.eval()


@pytest.fixture(scope="module")
def exports(tiny_data, tmp_path_factory):
    """{folder: (Fathom model, Fathom tokenizer)} of every preset plus an exported bf16 run, and what
    the isolated transformers process computed for each."""
    root = tmp_path_factory.mktemp("hf")
    tokenizers = tokenizer_files(tiny_data, root)
    out = {}
    for i, preset in enumerate(PRESETS):
        tokenizer = load_tokenizer(tokenizers[i % len(tokenizers)])
        cfg, model = train_in_process(preset, tokenizer.vocab_size)
        save_pretrained(model, cfg, root / preset, tokenizers[i % len(tokenizers)])
        out[str(root / preset)] = model, tokenizer
    run = train_tiny(tiny_data, root / "bf16-run", "train.precision=bf16", "train.max_steps=10", "monitor.every=0")
    export_main(["--run", str(run), "--output", str(root / "bf16")])
    _, model, _, data_path, meta = load_run(run)
    out[str(root / "bf16")] = model, load_tokenizer(data_path / meta["tokenizer"]["file"])
    (root / "isolated").mkdir()
    (root / "isolated" / "load.py").write_text(LOAD)
    # -S: site-packages join the path without their .pth files, one of which is the hook through
    # which an editable install of Fathom makes `model` importable from anywhere
    site_packages = json.dumps(site.getsitepackages())
    loaded = subprocess.run([sys.executable, "-I", "-S", "load.py", site_packages, json.dumps(TEXTS), str(NEW_TOKENS),
                             *out], cwd=root / "isolated",
                            env={"HF_HOME": str(root / "hf-home"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    assert loaded.returncode == 0, loaded.stderr[-4000:]
    return out, torch.load(root / "isolated" / "results.pt")


def test_every_preset_gives_fathoms_logits_and_greedy_tokens_under_transformers(exports):
    models, results = exports
    assert len(models) == len(PRESETS) + 1
    for folder, (model, tokenizer) in models.items():
        got = results[folder]
        prompt = torch.tensor([got["ids"][0]])
        expected = model(prompt)
        error = ((got["logits"] - expected).abs().max() / expected.abs().max()).item()
        assert error <= 1e-5, (folder, error)
        greedy = generate(model, prompt, NEW_TOKENS, temperature=0)
        # transformers stops at end-of-text; Fathom's sampler always makes NEW_TOKENS
        n = got["generated"].shape[1]
        assert torch.equal(got["generated"], greedy[:, :n]), folder
        assert n == greedy.shape[1] or got["generated"][0, -1] == tokenizer.eot_id
        assert torch.equal(got["uncached"], got["generated"])
        assert got["lengths"] == [prompt.shape[1]] + [1] * (n - prompt.shape[1] - 1), "the cache was not used"


def test_tokenizers_of_every_kind_encode_and_decode_as_fathoms(exports):
    models, results = exports
    kinds = set()
    for folder, (_, tokenizer) in models.items():
        kinds.add(tokenizer.kind)
        assert results[folder]["ids"] == tokenizer.encode_batch(TEXTS), (folder, tokenizer.kind)
        assert results[folder]["decoded"] == [tokenizer.decode(ids) for ids in tokenizer.encode_batch(TEXTS)]
    assert kinds == {"bpe", "bytes", "sentencepiece"}


def test_a_bf16_run_exports_its_fp32_master_weights(exports):
    from safetensors.torch import load_file

    folder = next(f for f in exports[0] if f.endswith("bf16"))
    weights = load_file(Path(folder) / "model.safetensors")
    assert all(w.dtype == torch.float32 for w in weights.values())
    # bf16 keeps 8 significant bits: masters that all rounded to themselves would be the bf16 copy
    assert any(not torch.equal(w, w.bfloat16().float()) for w in weights.values())


def test_the_exported_code_needs_only_torch_transformers_and_safetensors(exports):
    from transformers.dynamic_module_utils import get_imports

    folder = Path(next(iter(exports[0])))
    needed = {name for f in folder.glob("*.py") for name in get_imports(f)}
    assert needed - sys.stdlib_module_names == {"torch", "transformers"}
    assert json.loads((folder / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == \
        "modeling_fathom.FathomForCausalLM"


def test_lm_eval_scores_the_repository_task_as_fathom_does(exports, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    folder = next(f for f in exports[0] if f.endswith("bf16"))
    model, tokenizer = exports[0][folder]
    monkeypatch.chdir(ROOT)  # the task's data file is named relative to the checkout
    tasks = TaskManager(include_path=str(ROOT / "bench" / "lm_eval"), include_defaults=False)
    results = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={folder},trust_remote_code=True",
                                      tasks=["python_continuation"], task_manager=tasks, device="cpu", bootstrap_iters=0)
    docs = [json.loads(line) for line in (ROOT / "bench" / "lm_eval" / "python_continuation.jsonl").open()]
    correct = 0
    for doc in docs:
        # lm-eval's split: the continuation is what encoding context + choice adds to the context's tokens
        start = len(tokenizer.encode_batch([doc["context"]])[0])
        scores = []
        for choice in doc["choices"]:
            ids = tokenizer.encode_batch([doc["context"] + choice])[0]
            logp = model(torch.tensor([ids[:-1]])).log_softmax(-1)[0]
            scores.append(sum(logp[i - 1, ids[i]].item() for i in range(start, len(ids))))
        correct += scores.index(max(scores)) == doc["gold"]
    assert results["results"]["python_continuation"]["acc,none"] == pytest.approx(correct / len(docs))


def test_a_new_transformers_model_keeps_the_methods_init():
    """transformers re-initializes a new model's Linear/Embedding/LayerNorm weights by its own rule unless
    the model says otherwise: DeepNorm's beta and shaped attention's zero W_Q would be lost."""
    import dataclasses

    from tools.hf.configuration_fathom import FathomHFConfig
    from tools.hf.modeling_fathom import FathomForCausalLM

    for preset in ("deepnorm", "shaped"):
        cfg = load_config([f"configs/methods/{preset}.yaml"], TINY_MODEL).model
        torch.manual_seed(0)
        fathom = Transformer(cfg)
        torch.manual_seed(0)
        hf = FathomForCausalLM(FathomHFConfig(**dataclasses.asdict(cfg)))
        assert all(torch.equal(p, q) for p, q in zip(fathom.parameters(), hf.parameters()))


def test_export_into_a_folder_in_use_is_one_line(exports, capsys):
    folder = next(iter(exports[0]))
    with pytest.raises(SystemExit) as stop:
        export_main(["--run", folder, "--output", folder])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert stop.value.code == 2 and len(errors) == 1 and "is not empty" in errors[0]
