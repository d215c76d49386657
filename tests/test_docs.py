"""The results tables in README.md and docs/ are what their commands write from bench/results."""

import sys

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import tables  # noqa: E402


def test_every_results_table_is_what_its_command_writes(capsys):
    commands = [m["command"] for page in tables.pages() for m in tables.BLOCK.finditer(page.read_text())]
    assert len(commands) >= 5
    assert tables.main(["--check"]) == 0, capsys.readouterr().err


def test_a_table_edited_by_hand_is_named(tmp_path, monkeypatch, capsys):
    page = tmp_path / "page.md"
    command = "python bench/depth_table.py bench/results/sweep_bytes_lr3e-4"
    page.write_text(f"<!-- table: {command} -->\n| a | b |\n<!-- end table -->\n")
    monkeypatch.setattr(tables, "pages", lambda: [page])
    assert tables.main(["--check"]) == 1
    assert f"differs: {page}: {command}" in capsys.readouterr().err
    assert page.read_text().count("| a | b |") == 1  # --check writes nothing
