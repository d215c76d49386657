"""data.prepare at growing corpus sizes: peak memory and MB/s, per tokenizer and number of workers.

    python bench/prepare_scale.py [--sizes 50M,1G] [--tokenizers bytes,bpe] [--workers 1,2] [--work DIR]

Generates each corpus once (JSONL shards of 64 MB: documents of random lines of the Python standard
library, a fixed seed), runs `python -m data.prepare` on it as a user would, and reports the peak
RSS of the main process (the kernel's high-water mark) and of all its processes together (sampled
every 0.1 s), wall time and MB/s of text. Constant memory means the peaks do not grow with the size.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data.prepare import byte_size  # noqa: E402

SHARD_BYTES = 64 << 20


def stdlib_lines():
    root = Path(sysconfig.get_paths()["stdlib"])
    lines = []
    for path in sorted(root.glob("*.py")):
        lines += path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
    return lines


def generate(directory, size, seed=0):
    """JSONL shards holding `size` bytes of text: documents of 20-400 random stdlib lines."""
    directory.mkdir(parents=True)
    lines, rng = stdlib_lines(), np.random.default_rng(seed)
    written, shard, out = 0, 0, None
    while written < size:
        if out is None or out.tell() >= SHARD_BYTES:
            if out:
                out.close()
            out = open(directory / f"part_{shard:05d}.jsonl", "w")
            shard += 1
        text = "".join(lines[i] for i in rng.integers(0, len(lines), int(rng.integers(20, 400))))
        out.write(json.dumps({"text": text}) + "\n")
        written += len(text.encode())
    out.close()
    return written


def measure(corpus, output, tokenizer, workers):
    """(seconds, MB/s of the tokenizing pass, main peak RSS MB, all processes' peak RSS MB) of one data.prepare run."""
    log = output.with_suffix(".log")
    start = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "data.prepare", "--input", str(corpus), "--output", str(output),
                                 "--tokenizer", tokenizer, "--workers", str(workers)], cwd=ROOT, stdout=err, stderr=err)
    watched, tree_peak = psutil.Process(proc.pid), 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # reaped here, so its rusage is its own
        if pid:
            break
        try:
            tree_peak = max(tree_peak, sum(p.memory_info().rss for p in [watched, *watched.children(recursive=True)]))
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.1)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"data.prepare failed:\n{log.read_text()[-3000:]}")
    tokenize_speed = float(re.search(r"= ([\d.]+) MB/s", log.read_text())[1])
    return seconds, tokenize_speed, usage.ru_maxrss / 1024, tree_peak / 2**20


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="50M,1G", help="corpus sizes, e.g. 50M,1G")
    ap.add_argument("--tokenizers", default="bytes,bpe", help="comma-separated --tokenizer values")
    ap.add_argument("--workers", default="1,2", help="comma-separated --workers values")
    ap.add_argument("--work", help="folder for a temporary working folder (corpora and outputs, deleted at the end)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        print(f"{os.cpu_count()} CPU cores")
        print("| text | tokenizer | workers | wall | MB/s (wall) | MB/s (tokenizing pass) | peak RSS, main process | "
              "peak RSS, all processes |")
        print("|---|---|---|---|---|---|---|---|")
        for size in args.sizes.split(","):
            corpus = Path(work) / f"corpus-{size}"
            text = generate(corpus, byte_size(size))
            for tokenizer in args.tokenizers.split(","):
                for workers in map(int, args.workers.split(",")):
                    output = Path(work) / f"out-{size}-{tokenizer}-{workers}"
                    seconds, speed, main_peak, tree_peak = measure(corpus, output, tokenizer, workers)
                    print(f"| {text / 1e6:,.0f} MB | {tokenizer} | {workers} | {seconds:.0f} s | {text / 1e6 / seconds:.2f} "
                          f"| {speed:.2f} | {main_peak:,.0f} MB | {tree_peak:,.0f} MB |", flush=True)
                    shutil.rmtree(output)


if __name__ == "__main__":
    main()
