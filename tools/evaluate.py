"""Loss and perplexity of a trained run over a whole data split.

    python -m tools.evaluate --run OUT_DIR [--checkpoint TAG] [--data DIR] [--split val] [--batch 16]

Every window of seq_len + 1 tokens of the split (the window set "all"; the trainer's val_loss and
final_eval_loss are the same function over "first:N" and "spread:N", launch/validation.py),
batched; prints one JSON line and appends it to OUT_DIR/eval.jsonl: {"step", "split", "loss",
"ppl", "tokens"}.
"""

import argparse
import json
import math

from configs import exit_on_error
from launch.run_dir import RunDir


def main(argv=None):
    from tools.pretrained import load_run

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="the run directory (train.out_dir)")
    ap.add_argument("--checkpoint", help="a checkpoint tag such as step_00001200 (default: the newest)")
    ap.add_argument("--data", help="a prepared data directory (default: the run's data)")
    ap.add_argument("--split", default="val", choices=["val", "train"])
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args(argv)
    import torch

    from data.loader import ValBatches
    from launch.validation import validation_loss

    cfg, model, marker, data_path, _ = exit_on_error(load_run, args.run, args.checkpoint, args.data)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    windows = ValBatches(data_path, cfg.train.seq_len, args.batch, 1, 0, "all", split=args.split)
    loss = validation_loss(model.to(device).eval(), windows, device, progress=True)
    tokens = windows.num_windows * cfg.train.seq_len
    record = {"step": marker["step"], "split": args.split, "loss": loss, "ppl": math.exp(loss), "tokens": tokens}
    with open(RunDir(args.run).eval, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
