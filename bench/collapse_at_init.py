"""Collapse at init for every method preset: deepest-layer token cosine vs depth, per init scheme.

    python bench/collapse_at_init.py [--depths 12,48,192,768] [--inits fanin,gpt2] [--plot-depth 192]
                                     [--plot collapse_at_init.png] [key=value ...]

Prints a Markdown table (rows: preset × init, columns: depth) and plots cos_sim vs layer at one
depth for every preset, one panel per init. Held-out text of the built-in corpus; no training.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from configs import exit_on_error, load_config  # noqa: E402
from monitors.probe import held_out_tokens, probe  # noqa: E402

PRESETS = ["vanilla", "pre", "deepnorm", "surgery", "spectral", "gapfree", "shaped"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depths", default="12,48,192,768")
    ap.add_argument("--inits", default="fanin,gpt2")
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--plot-depth", type=int, default=192)
    ap.add_argument("--plot", default="collapse_at_init.png")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    depths = [int(d) for d in args.depths.split(",")]
    inits, presets = args.inits.split(","), args.presets.split(",")

    idx = None
    table, curves = {}, {init: {} for init in inits}
    for init in inits:
        for preset in presets:
            cfg = exit_on_error(load_config, [f"configs/methods/{preset}.yaml"], [*args.overrides, f"model.init={init}"])
            idx = held_out_tokens(cfg, args.batch, cfg.train.seq_len) if idx is None else idx
            for depth in depths:
                cfg.model.n_layers = depth
                layers = probe(cfg, idx)
                table[preset, init, depth] = layers[-1]["cos_sim"]
                if depth == args.plot_depth:
                    curves[init][preset] = layers
            print(f"{preset:>9} {init:>6}: " + "  ".join(f"{table[preset, init, d]:.3f}" for d in depths), file=sys.stderr)

    print(f"Deepest-layer mean token cosine similarity at init (batch {args.batch} x {cfg.train.seq_len} "
          f"held-out tokens, d_model {cfg.model.d_model}):\n")
    print("| preset | init | " + " | ".join(f"depth {d}" for d in depths) + " |")
    print("|---|---|" + "---|" * len(depths))
    for init in inits:
        for preset in presets:
            print(f"| {preset} | {init} | " + " | ".join(f"{table[preset, init, d]:.3f}" for d in depths) + " |")

    if any(curves.values()):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(inits), figsize=(5 * len(inits), 4), sharey=True, squeeze=False)
        for ax, init in zip(axes[0], inits):
            for preset, layers in curves[init].items():
                ax.plot([r["layer"] for r in layers], [r["cos_sim"] for r in layers], label=preset)
            ax.set(title=f"init={init}, {args.plot_depth} layers", xlabel="layer", ylim=(-0.05, 1.05))
        axes[0][0].set_ylabel("mean token cosine similarity")
        axes[0][-1].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        print(f"\nwrote {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
