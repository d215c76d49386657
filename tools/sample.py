"""Sample text from a trained run with its own tokenizer and cached decoding.

    python -m tools.sample --run OUT_DIR [--prompt TEXT] [--max-new-tokens N] [--temperature T] [--top-k K] [--seed S]
"""

import argparse

from configs import ConfigError, exit_on_error


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--checkpoint", help="a checkpoint tag (default: the newest)")
    ap.add_argument("--prompt", default="def ")
    ap.add_argument("--max-new-tokens", type=int, default=100)
    ap.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    import torch

    from data.tokenizer import tokenizer_from_meta
    from model.decode import generate
    from tools.pretrained import load_run

    cfg, model, _, data_path, meta = exit_on_error(load_run, args.run, args.checkpoint)
    tok = tokenizer_from_meta(data_path, meta)
    prompt = tok.encode_batch([args.prompt])[0] or [meta["eot_id"]]

    def check_length():
        if len(prompt) >= cfg.model.max_seq_len:
            raise ConfigError(f"the prompt is {len(prompt)} tokens, the model's context is {cfg.model.max_seq_len}: "
                              "shorten --prompt")

    exit_on_error(check_length)
    generator = torch.Generator().manual_seed(args.seed)
    out = generate(model, torch.tensor([prompt]), args.max_new_tokens, args.temperature, args.top_k, generator)
    print(tok.decode(out[0].tolist()))


if __name__ == "__main__":
    main()
