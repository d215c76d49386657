"""Data pipeline throughput: data.prepare in MB/s of text, and the loader's tokens/s as a ratio to
what the trainer consumes on the default config.

    python bench/prepare_speed.py [--workers 2] [--batches 200]

Input: the built-in corpus's documents (the Python standard library, ~31 MB), prepared into a
temporary directory with a freshly trained byte-level BPE of 8,192 tokens.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batches", type=int, default=200)
    args = ap.parse_args()
    import datasets

    from configs import load_config
    from data.loader import TrainBatches
    from data.prepare import prepare
    from data.stdlib_corpus import stdlib_documents

    docs = stdlib_documents()
    megabytes = sum(len(d.encode("utf-8", "replace")) for d in docs) / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        prepare(datasets.Dataset.from_dict({"text": docs}), Path(tmp) / "data", workers=args.workers)
        prepare_s = time.perf_counter() - start

        cfg = load_config(["configs/default.yaml"])
        t = cfg.train
        loader = TrainBatches(Path(tmp) / "data", t.seq_len, t.micro_batch_size, 1, 1, 0, t.seed)
        start = time.perf_counter()
        for step in range(args.batches):
            loader.micro_batch_at(step * loader.global_batch, 0)
        loader_tps = args.batches * t.micro_batch_size * t.seq_len / (time.perf_counter() - start)

    from step_time import make_step, timed

    bench_args = argparse.Namespace(n_layers=cfg.model.n_layers, d_model=cfg.model.d_model, n_heads=cfg.model.n_heads,
                                    seq_len=t.seq_len, batch=t.micro_batch_size, vocab=cfg.model.vocab_size)
    import torch

    step = make_step("surgery", bench_args, torch.device("cpu"), torch.float32)  # the default run's method
    step()
    trainer_tps = t.micro_batch_size * t.seq_len / statistics.median(timed(step, torch.device("cpu")) for _ in range(5))
    print(f"CPU, {args.workers} prepare workers; {megabytes:.1f} MB of text, {len(docs)} documents")
    print("| quantity | value |")
    print("|---|---|")
    print(f"| data.prepare (tokenizer training + tokenizing + writing) | {prepare_s:.1f} s = {megabytes / prepare_s:.2f} MB/s |")
    print(f"| loader, micro batches of {t.micro_batch_size} x {t.seq_len} | {loader_tps:,.0f} tokens/s |")
    print(f"| trainer, default config (one process) | {trainer_tps:,.0f} tokens/s |")
    print(f"| loader / trainer | {loader_tps / trainer_tps:,.0f}x |")


if __name__ == "__main__":
    main()
