"""Next-token cross-entropy computed in chunks, so the full logits never exist at once.

For Llama-2-7B with a micro-batch of 2 x 2048 tokens the logits are 4096 x 32000 floats: 0.5 GiB in
fp32, plus as much again for their gradient. Chunking the tokens and recomputing each chunk's
logits in the backward pass (activation checkpointing) keeps only one chunk alive.
"""

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _chunk_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = (hidden @ weight.t()).float()                                    # (N, vocab) fp32
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def causal_lm_loss(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor,
                   chunk_size: int = 1024) -> torch.Tensor:
    """Mean cross-entropy of predicting labels[:, t+1] from hidden[:, t].

    hidden (B, T, C) final hidden states, lm_head_weight (vocab, C), labels (B, T) with -100 where no
    loss is taken. Returns a scalar (0 when no position carries a loss).
    """
    C = hidden.shape[-1]
    h = hidden[:, :-1].reshape(-1, C)                                         # (B*(T-1), C)
    y = labels[:, 1:].reshape(-1)                                             # (B*(T-1),)
    count = (y != IGNORE_INDEX).sum()
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, y.numel(), chunk_size):
        hc, yc = h[start:start + chunk_size], y[start:start + chunk_size]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss_sum, hc, lm_head_weight, yc, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(hc, lm_head_weight, yc)
    return total / count.clamp(min=1)
