"""Loss and perplexity of a trained run over a whole data split.

    python -m tools.evaluate --run OUT_DIR [--checkpoint TAG] [--data DIR] [--split val] [--batch 16]

Every window of seq_len + 1 tokens of the split, in file order (deterministic), batched; prints
one JSON line and appends it to OUT_DIR/eval.jsonl: {"step", "split", "loss", "ppl", "tokens"}.
"""

import argparse
import json
import math
import sys

from configs import exit_on_error
from launch.run_dir import RunDir


def evaluate_split(model, data_path, split, seq_len, batch, device):
    import numpy as np
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from data.loader import TokenShards, to_tensors

    shards = TokenShards(data_path, split, seq_len)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in tqdm(range(0, shards.num_windows, batch), desc=f"evaluate {split}", file=sys.stderr):
            x, y = to_tensors(shards.windows(np.arange(start, min(start + batch, shards.num_windows))), device)
            total += F.cross_entropy(model(x).float().flatten(0, 1), y.flatten(), reduction="sum").item()
            tokens += y.numel()
    return total / tokens, tokens


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

    cfg, model, marker, data_path, _ = exit_on_error(load_run, args.run, args.checkpoint, args.data)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loss, tokens = evaluate_split(model.to(device), data_path, args.split, cfg.train.seq_len, args.batch, device)
    record = {"step": marker["step"], "split": args.split, "loss": loss, "ppl": math.exp(loss), "tokens": tokens}
    with open(RunDir(args.run).eval, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
