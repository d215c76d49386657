"""Collapse metrics of every layer of a trained run, on the probe batch its training monitor used.

    python -m tools.collapse --run OUT_DIR [--checkpoint TAG] [--json]

The first `monitor.batch` windows of the validation split (`monitor.seq_len` tokens), the metrics
of monitors/metrics.py and the run's own thresholds: the monitor's record at that step, measured
again now, so a checkpoint's collapse can be read after the run (or after a fix to a metric). Prints
one line per layer and the number of collapsed layers (JSON with --json).
"""

import argparse
import json

from configs import exit_on_error


def measure(run, tag=None):
    """{"step", "collapsed_layers", "layers"} of a run's checkpoint (default: the newest), measured on
    the run's monitor probe batch with its thresholds."""
    import torch

    from data.loader import ValBatches
    from monitors.collapse import evenly_spaced, measure_layers
    from monitors.metrics import collapsed, read_once
    from tools.pretrained import load_run

    cfg, model, marker, data_path, _ = load_run(run, tag)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    m = cfg.monitor
    probe = ValBatches(data_path, m.seq_len or cfg.train.seq_len, m.batch, 1, 0, f"first:{m.batch}")
    tokens = next(probe.batches(device))[0]
    model.to(device)
    layers = read_once(measure_layers(model, model, tokens, evenly_spaced(cfg.model.n_heads, m.heads)))
    n = sum(collapsed(layer, m.collapse_threshold, m.stable_rank_threshold) for layer in layers)
    return {"step": marker["step"], "collapsed_layers": n, "layers": layers,
            "thresholds": {"cos_sim": m.collapse_threshold, "stable_rank": m.stable_rank_threshold}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="the run directory (train.out_dir)")
    ap.add_argument("--checkpoint", help="a checkpoint tag such as step_00001200 (default: the newest)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    out = exit_on_error(measure, args.run, args.checkpoint)
    if args.json:
        print(json.dumps(out))
        return
    print(f"step {out['step']}:  layer  cos_sim  t_sim  stable_rank  rms    attn_sigma_ratio")
    for r in out["layers"]:
        print(f"{r['layer']:>14d}  {r['cos_sim']:7.4f}  {r['t_sim']:5.3f}  {r['stable_rank']:11.3f}  "
              f"{r['rms']:.3f}  {r['attn_sigma_ratio']:.4f}")
    t = out["thresholds"]
    print(f"collapsed layers: {out['collapsed_layers']} of {len(out['layers'])} (token cosine >= {t['cos_sim']} "
          f"or stable rank <= {t['stable_rank']})")


if __name__ == "__main__":
    main()
