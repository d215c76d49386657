"""Collapse at init: run held-out text through a freshly initialised model and measure every layer.

    python -m monitors.probe [--config F ...] [key=value ...] [--depths 12,48,192,768] [--json] [--plot out.png]

Reports per layer (layer 0 = output of the first block) the mean pairwise token cosine
similarity, the similarity ratio t_sim, the stable rank and the activation RMS (monitors/metrics.py).
"""

import argparse
import json

from configs import exit_on_error, load_config


def held_out_tokens(cfg, batch, seq_len):
    """The first `batch` windows of the validation split of the configured data."""
    import numpy as np
    import torch

    from data.loader import TokenShards
    from data.resolve import resolve_data

    path, _ = exit_on_error(resolve_data, cfg)
    shards = TokenShards(path, "val", seq_len)
    return torch.from_numpy(shards.windows(np.arange(batch))[:, :-1])


def probe(cfg, idx, seed=0):
    """Per-layer metrics of the model `cfg.model` at init on tokens idx, each layer measured as it runs."""
    import torch

    from model import Transformer
    from monitors.collapse import block_hooks
    from monitors.metrics import hidden_state_metrics, read_once

    torch.manual_seed(seed)
    model, layers = Transformer(cfg.model).eval(), []
    with torch.no_grad(), block_hooks(model, lambda i, output: layers.append({"layer": i, **hidden_state_metrics(output)})):
        model(idx)
    return read_once(layers)


def plot(results, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, layers in results.items():
        ax.plot([r["layer"] for r in layers], [r["cos_sim"] for r in layers], label=label)
    ax.set(xlabel="layer", ylabel="mean token cosine similarity", title=title, ylim=(-0.05, 1.05))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Collapse metrics per layer of a model at init.")
    ap.add_argument("--config", action="append", default=[])
    ap.add_argument("--depths", help="comma-separated model.n_layers values, e.g. 12,48,192,768")
    ap.add_argument("--batch", type=int, default=4, help="held-out sequences")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--plot", help="write a PNG of cos_sim vs layer")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args(argv)
    cfg = exit_on_error(load_config, args.config, args.overrides)
    depths = [int(d) for d in args.depths.split(",")] if args.depths else [cfg.model.n_layers]
    idx = held_out_tokens(cfg, args.batch, cfg.train.seq_len)
    results = {}
    for depth in depths:
        cfg.model.n_layers = depth
        results[str(depth)] = probe(cfg, idx, args.seed)
    if args.plot:
        plot({f"{d} layers": r for d, r in results.items()}, args.plot, " + ".join(args.config) or "defaults")
    if args.json:
        by_depth = {d: {"layers": r} for d, r in results.items()}
        print(json.dumps({"depths": by_depth} if args.depths else by_depth[str(depths[0])]))
        return
    for depth, layers in results.items():
        print(f"depth {depth}:  layer  cos_sim  t_sim  stable_rank  rms")
        for r in layers:
            print(f"{r['layer']:>14d}  {r['cos_sim']:7.4f}  {r['t_sim']:5.3f}  {r['stable_rank']:11.2f}  {r['rms']:.3f}")


if __name__ == "__main__":
    main()
