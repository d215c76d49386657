"""The reference of every config key as a Markdown table, from the schema.

    python -m configs                  print it
    python -m configs --update-readme  rewrite the table between README.md's key markers
"""

import re
import sys
from pathlib import Path

from configs import schema_fields

README = Path(__file__).resolve().parent.parent / "README.md"


def markdown_table():
    rows = ["| key | default | allowed | what it does |", "|---|---|---|---|"]
    for key, f in schema_fields():
        allowed = ", ".join(map(str, f.metadata["choices"])) if "choices" in f.metadata else f.metadata.get("check", (0, ""))[1]
        rows.append(f"| `{key}` | `{f.default!r}` | {allowed} | {f.metadata['help']} |")
    return "\n".join(rows)


def update_readme():
    text = README.read_text()
    pattern = re.compile(r"(<!-- keys:[^\n]*-->\n).*?(\n<!-- /keys -->)", re.S)
    README.write_text(pattern.sub(lambda m: m.group(1) + markdown_table() + m.group(2), text))


if __name__ == "__main__":
    update_readme() if "--update-readme" in sys.argv else print(markdown_table())
