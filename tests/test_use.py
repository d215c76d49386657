"""Using what was trained: evaluate any checkpoint, sample, export and load it back."""

import json

import pytest
import torch

from tests.conftest import run_cli
from tests.test_train import read_jsonl


def test_evaluate_a_2_rank_zero2_checkpoint_matches_the_training_validation(resumed_runs):
    straight, _ = resumed_runs["torchrun", 2]
    last_val = [r["val_loss"] for r in read_jsonl(straight / "metrics.jsonl") if "val_loss" in r][-1]
    proc = run_cli("-m", "tools.evaluate", "--run", str(straight))
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["loss"] == pytest.approx(last_val, rel=1e-6)
    assert record["ppl"] == pytest.approx(2.718281828459045 ** record["loss"])
    assert record["step"] == 6 and record["split"] == "val" and record["tokens"] > 0
    assert read_jsonl(straight / "eval.jsonl")[-1] == record


def test_export_then_from_pretrained_reproduces_the_logits(resumed_runs, tmp_path):
    from tools.pretrained import from_pretrained, load_run

    straight, _ = resumed_runs["torchrun", 2]
    run_cli("-m", "tools.export", "--run", str(straight), "--output", str(tmp_path / "export"))
    assert {"config.yaml", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "export").iterdir()}
    _, model, *_ = load_run(straight)
    loaded = from_pretrained(tmp_path / "export")
    idx = torch.randint(0, model.config.vocab_size, (2, 16))
    assert torch.equal(model(idx), loaded(idx))


def test_sample_decodes_with_the_runs_tokenizer(tiny_run):
    proc = run_cli("-m", "tools.sample", "--run", str(tiny_run), "--prompt", "import os", "--max-new-tokens", "12",
                   "--seed", "1")
    again = run_cli("-m", "tools.sample", "--run", str(tiny_run), "--prompt", "import os", "--max-new-tokens", "12",
                    "--seed", "1")
    assert proc.stdout.startswith("import os") and len(proc.stdout) > len("import os") and proc.stdout == again.stdout


@pytest.mark.parametrize("command,extra,message", [
    ("tools.evaluate", ["--run", "EMPTY"], "has no complete checkpoint"),
    ("tools.evaluate", ["--run", "RUN", "--data", "OTHER"], "is not the one"),
    ("tools.sample", ["--run", "RUN", "--prompt", "x = 1\n" * 200], "the prompt is"),
    ("tools.export", ["--run", "/no/run", "--output", "OUT"], "is not a Fathom run directory"),
])
def test_bad_input_is_one_line(tiny_run, other_data, tmp_path, command, extra, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.yaml").write_text("model: {}\n")
    subst = {"EMPTY": str(empty), "RUN": str(tiny_run), "OTHER": str(other_data), "OUT": str(tmp_path / "out")}
    proc = run_cli("-m", command, *[subst.get(a, a) for a in extra], check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
