"""The results tables of README.md and docs/, written from bench/results by the command that makes them.

A generated table sits in a page between two markers, the first naming its command:

    <!-- table: python bench/depth_table.py bench/results/sweep_bytes -->
    ...
    <!-- end table -->

    python bench/tables.py            # rerun every command, write its tables between the markers
    python bench/tables.py --check    # compare only: exit 1 naming each page and command that differ

Each command is one of bench/'s table scripts; it runs with `--output` into a temporary folder,
from the checkout, so a page can be regenerated anywhere; a test runs --check.
"""

import argparse
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"(<!-- table: (?P<command>.+?) -->\n)(?P<body>.*?)(<!-- end table -->)", re.S)


def pages():
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def generate(command):
    """What `command` writes as its --output, run from the checkout."""
    argv = shlex.split(command)
    if argv[:2] != ["python", argv[1]] or not argv[1].startswith("bench/"):
        raise ValueError(f"table command {command!r}: write `python bench/<script>.py ARGS`")
    with tempfile.TemporaryDirectory() as tmp:
        output = Path(tmp) / "table.md"
        subprocess.run([sys.executable, *argv[1:], "--output", str(output)], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
        return output.read_text().rstrip("\n") + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compare only; exit 1 if a table differs")
    args = ap.parse_args(argv)
    stale = []
    for page in pages():
        text = page.read_text()

        name = page.relative_to(ROOT) if page.is_relative_to(ROOT) else page

        def fill(match, name=name):
            body = generate(match["command"])
            if body != match["body"]:
                stale.append(f"{name}: {match['command']}")
            return match.group(1) + body + match.group(4)

        updated = BLOCK.sub(fill, text)
        if updated != text and not args.check:
            page.write_text(updated)
    for line in stale:
        print(("differs: " if args.check else "updated: ") + line, file=sys.stderr)
    if args.check and stale:
        print("run `python bench/tables.py` to write them from bench/results", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
