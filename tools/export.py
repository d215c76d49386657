"""Export a run's checkpoint as consolidated fp32 weights, its config and its tokenizer.

    python -m tools.export --run OUT_DIR --output DIR [--checkpoint TAG]

Writes DIR/model.safetensors, DIR/config.yaml and the run's tokenizer file, which
`tools.pretrained.from_pretrained(DIR)` loads; and config.json, its code (modeling_fathom.py and the model
files it imports) and a fast tokenizer, which transformers loads without Fathom:
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`, `AutoTokenizer.from_pretrained(DIR)`.
"""

import argparse
from pathlib import Path

from configs import ConfigError, exit_on_error


def export(run, output, tag=None):
    from tools.pretrained import load_run, save_pretrained

    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise ConfigError(f"--output {str(output)!r} already exists and is not empty: choose a new folder")
    cfg, model, marker, data_path, meta = load_run(run, tag)
    save_pretrained(model, cfg, output, Path(data_path) / meta["tokenizer"]["file"])
    return output, marker["step"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--checkpoint", help="a checkpoint tag (default: the newest)")
    args = ap.parse_args(argv)
    output, step = exit_on_error(export, args.run, args.output, args.checkpoint)
    print(f"exported step {step} of {args.run} to {output}")


if __name__ == "__main__":
    main()
