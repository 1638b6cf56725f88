"""Collectives both trainers need: features of every worker, with their gradient.

Stage two's contrastive losses and stage one's caption-contrastive tuning both compute a loss
over the global batch (negatives from all workers); this is the one all-gather they share.
"""

from __future__ import annotations


def gather_features(x):
    """Concatenate ``x`` [n_r, ...] from every worker along dim 0 → [Σ n_r, ...], keeping the
    gradient; identity in a single process.

    Workers may hold different row counts (a batch loses its undecodable images): all_gather
    needs equal shapes, so each worker pads to the largest count and the padding rows are
    cut out after the gather. Padding never reaches a loss, so it gets no gradient.
    """
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    counts = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, n)
    counts = [int(c) for c in counts]
    longest = max(counts)
    if x.shape[0] < longest:
        x = torch.cat([x, x.new_zeros((longest - x.shape[0], *x.shape[1:]))])
    # torch.distributed.nn's all_gather is autograd-aware (dist.all_gather is not: its
    # outputs carry no gradient back to the rank that produced them).
    import torch.distributed.nn

    parts = torch.distributed.nn.functional.all_gather(x.contiguous())
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)], dim=0)
