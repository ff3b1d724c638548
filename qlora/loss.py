"""Next-token cross-entropy computed in chunks, so the full logits never exist at once.

For Llama-2-7B with a micro-batch of 2 x 2048 tokens the logits are 4096 x 32000 floats: 0.5 GiB in
fp32, plus as much again for their gradient. Chunking the tokens and recomputing each chunk's
logits in the backward pass (activation checkpointing) keeps only one chunk alive.

Token weighting. An optimizer step over several micro-batches (gradient accumulation) minimises
    sum of every token loss in the step / number of label tokens in the step,
the loss of one big batch holding all of them (transformers >= 4.46 does the same with
num_items_in_batch). Averaging each micro-batch's mean instead would weigh a micro-batch of short
answers as much as one of long answers. So the trainer counts the step's label tokens first
(label_count) and passes that count as `num_items` to every micro-batch's loss.
"""

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _loss_dtype(hidden: torch.Tensor) -> torch.dtype:
    """fp32 logits and sums, whatever the compute dtype; float64 stays float64 (the exact tests)."""
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


def _chunk_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = (hidden @ weight.t()).to(_loss_dtype(hidden))                    # (N, vocab) fp32 (fp64 in tests)
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def label_count(labels: torch.Tensor) -> int:
    """Positions of labels (B, T) that carry a loss (the shifted labels[:, 1:] that are not -100)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def causal_lm_loss(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor,
                   chunk_size: int = 1024, num_items: int | None = None) -> torch.Tensor:
    """Sum of the cross-entropies of predicting labels[:, t+1] from hidden[:, t], / num_items.

    hidden (B, T, C) final hidden states, lm_head_weight (vocab, C), labels (B, T) with -100 where no
    loss is taken. num_items: the label tokens of the whole optimizer step (see above); None: this
    batch's own count, i.e. the mean. Returns a scalar (0 when no position carries a loss).
    """
    C = hidden.shape[-1]
    h = hidden[:, :-1].reshape(-1, C)                                         # (B*(T-1), C)
    y = labels[:, 1:].reshape(-1)                                             # (B*(T-1),)
    count = (y != IGNORE_INDEX).sum() if num_items is None else torch.tensor(num_items)
    total = hidden.new_zeros((), dtype=_loss_dtype(hidden))
    for start in range(0, y.numel(), chunk_size):
        hc, yc = h[start:start + chunk_size], y[start:start + chunk_size]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss_sum, hc, lm_head_weight, yc, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(hc, lm_head_weight, yc)
    return total / count.clamp(min=1)
