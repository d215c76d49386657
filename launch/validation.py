"""The validation loss: one function for every window set (data/loader.py's window_set), used by
the trainer's periodic val_loss (first:N), its final_eval_loss (spread:N) and tools.evaluate (all),
so the three differ only in the windows they name."""

import sys


def validation_loss(forward, batches, device, progress=False):
    """Mean token loss of `forward` over the windows of `batches` (a ValBatches), summed over the
    ranks first, so every window counts once whatever the world size."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from tqdm import tqdm

    total = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for x, y, mask in tqdm(batches.batches(device), desc=f"loss over {batches.name}", file=sys.stderr,
                               disable=not progress):
            losses = F.cross_entropy(forward(x).float().transpose(1, 2), y, reduction="none")  # [B, T]
            total[0] += (losses.sum(1) * mask).sum().double()
            total[1] += mask.sum().double() * y.shape[1]
    if dist.is_initialized():
        dist.all_reduce(total)
    return (total[0] / total[1]).item()


class Evaluation:
    """The trainer's evaluations: val_loss on the val split's first train.eval_batches batches every
    train.eval_every steps and at the end, and at the end final_eval_loss on train.final_eval_windows
    windows spread over the whole split: the score runs are compared by, the same windows for every
    seed and depth (the first windows alone can sit a third of a nat off a full pass)."""

    def __init__(self, engine, sources, t, world_size, rank, log, unigram_entropy):
        from data.loader import ValBatches

        self.engine, self.t, self.log, self.unigram_entropy = engine, t, log, unigram_entropy
        self.first = ValBatches(sources, t.seq_len, t.micro_batch_size, world_size, rank,
                                f"first:{t.eval_batches * t.micro_batch_size}")
        self.final = ValBatches(sources, t.seq_len, t.micro_batch_size, world_size, rank,
                                f"spread:{t.final_eval_windows}") if t.final_eval_windows else None

    def loss(self, batches):
        self.engine.eval()
        try:
            return validation_loss(self.engine, batches, self.engine.device)
        finally:
            self.engine.train()

    def after_step(self, done):
        last = done == self.t.max_steps
        if done % self.t.eval_every == 0 or last:
            val_loss = self.loss(self.first)
            self.log.write({"step": done, "val_loss": val_loss}, "val")
            self.log.info(f"step {done}: val_loss {val_loss:.4f} (unigram entropy {self.unigram_entropy:.4f})")
        if last and self.final:
            final_loss = self.loss(self.final)
            self.log.write({"step": done, "final_eval_loss": final_loss, "eval_windows": self.final.num_windows}, "val")
            self.log.info(f"step {done}: final_eval_loss {final_loss:.4f} over {self.final.num_windows} windows "
                          "spread over the val split")
