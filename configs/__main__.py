"""Print the reference of every config key as a Markdown table (pasted into README.md)."""

from configs import schema_fields


def markdown_table():
    rows = ["| key | default | allowed | what it does |", "|---|---|---|---|"]
    for key, f in schema_fields():
        allowed = ", ".join(map(str, f.metadata["choices"])) if "choices" in f.metadata else f.metadata.get("check", (0, ""))[1]
        rows.append(f"| `{key}` | `{f.default!r}` | {allowed} | {f.metadata['help']} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
