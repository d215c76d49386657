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
