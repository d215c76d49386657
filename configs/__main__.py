"""The reference of every config key as a Markdown table, from the schema.

    python -m configs                 print it
    python -m configs --update-docs   rewrite the table between docs/configuration.md's key markers
"""

import re
import sys
from pathlib import Path

from configs import schema_fields

DOCS = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def markdown_table():
    rows = ["| key | default | allowed | what it does |", "|---|---|---|---|"]
    for key, f in schema_fields():
        allowed = ", ".join(map(str, f.metadata["choices"])) if "choices" in f.metadata else f.metadata.get("check", (0, ""))[1]
        rows.append(f"| `{key}` | `{f.default!r}` | {allowed} | {f.metadata['help']} |")
    return "\n".join(rows)


def update_docs():
    text = DOCS.read_text()
    pattern = re.compile(r"(<!-- keys:[^\n]*-->\n).*?(\n<!-- /keys -->)", re.S)
    text, found = pattern.subn(lambda m: m.group(1) + markdown_table() + m.group(2), text)
    if not found:  # a table moved without its markers would otherwise go stale without a word
        sys.exit(f"error: {DOCS} has no <!-- keys: ... --> ... <!-- /keys --> markers")
    DOCS.write_text(text)


if __name__ == "__main__":
    update_docs() if "--update-docs" in sys.argv else print(markdown_table())
