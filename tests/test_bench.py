"""The one-command GPU benchmark, run end to end at toy sizes on the CPU."""

import pytest

from tests.conftest import run_cli


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
