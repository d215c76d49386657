"""The one-command GPU benchmark, run end to end at toy sizes on the CPU."""

import pytest

from tests.conftest import ROOT, run_cli


@pytest.mark.slow
def test_gpu_benchmark_writes_one_table_from_every_stage(tiny_data, tmp_path):
    proc = run_cli("bench/gpu.py", "--smoke", "--output", str(tmp_path), "--data", str(tiny_data),
                   env={"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    text = (tmp_path / "CPU_smoke.md").read_text()
    assert text in proc.stdout
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    labels = [row.split(" | ")[0].removeprefix("| ") for row in rows]
    assert labels[:2] == ["vanilla step, eager", "pre / vanilla, eager"]
    assert labels[2:] == ["trainer, 2 layers (ZeRO-1, steps 2–4)", "one monitor step (every 100 steps)",
                          "the monitor's extra memory (pre-step copies + probe)"]
    assert "tokens/s" in rows[2] and "training steps" in rows[3]


def test_gpu_benchmark_without_a_gpu_says_so():
    proc = run_cli("bench/gpu.py", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: no CUDA GPU here: bench/gpu.py measures one; `--smoke` runs its stages at "
                                   "toy sizes on the CPU")


def test_step_time_times_another_revision_in_the_same_rounds():
    proc = run_cli("bench/step_time.py", "--n-layers", "1", "--d-model", "16", "--n-heads", "2", "--seq-len", "16",
                   "--batch", "1", "--vocab", "64", "--repeats", "1", "--warmup", "0", "--presets", "vanilla,shaped",
                   "--against", "HEAD", env={"OMP_NUM_THREADS": "1"})
    lines = proc.stdout.splitlines()
    assert lines[0].endswith("; against HEAD, in the same rounds")
    assert lines[1].endswith("| HEAD: ratio to its vanilla | this / HEAD |")
    vanilla, shaped = (line.strip("| ").split(" | ") for line in lines[3:5])
    assert vanilla[0] == "vanilla" and vanilla[-2] == "1.000" and float(vanilla[-1]) > 0
    assert shaped[0] == "shaped" and float(shaped[-2]) > 0 and float(shaped[-1]) > 0


def test_another_revisions_code_is_imported_beside_this_checkouts(tmp_path):
    import importlib.util
    import sys

    import model
    spec = importlib.util.spec_from_file_location("step_time", ROOT / "bench" / "step_time.py")
    step_time = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(step_time)
    _, transformer = step_time.revision_code("HEAD", tmp_path)
    assert transformer.forward.__code__.co_filename == str(tmp_path / "model" / "transformer.py")
    assert sys.modules["model"] is model and model.Transformer is not transformer


def test_step_time_names_a_revision_that_does_not_exist():
    proc = run_cli("bench/step_time.py", "--against", "no-such-revision", check=False)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: --against no-such-revision: ")


def test_stack_norms_compares_the_same_run_without_and_with_the_rule(tiny_data, tmp_path):
    """bench/stack_norms.py trains both arms from the same weights and data: at L = L_base, where the
    stack-norm rule is the identity, every column of the two arms agrees; deeper, the rule slows the
    stack norms, so their summed gains spread less."""
    def table(layers):
        out = tmp_path / f"{layers}.md"
        run_cli("bench/stack_norms.py", "--layers", str(layers), "--steps", "4", "--every", "2", "--output", str(out),
                "model.depth_scaling.base_layers=2", f"data.path={tiny_data}", "model.d_model=16",
                env={"OMP_NUM_THREADS": "1"})
        rows = [line.strip("| ").split(" | ") for line in out.read_text().splitlines()[4:]]
        return [[cell.split(" / ") for cell in row[1:]] for row in rows]

    assert all(without == with_rule for row in table(2) for without, with_rule in row)
    spread = [float(x) for x in table(8)[-1][1]]
    assert spread[1] < spread[0]
