"""The loss: next-token cross-entropy, summed over the supervised positions.

Shared by the training loop (train.py) and the held-out evaluation (evaluate.py), so that the
number evaluation reports is the very quantity training minimises.
"""

import torch
import torch.nn.functional as F

from yoda_raw.chat import IGNORE


def token_loss_sum(model, batch: dict) -> torch.Tensor:
    """Sum of next-token cross-entropy over the supervised positions of one micro-batch.

    Returning the *sum* (not the mean) is what makes accumulation exact: the step's loss is
    sum over all micro-batches and processes / number of supervised tokens in the step. Averaging
    each micro-batch and then averaging the averages weights a token in a sparse micro-batch more
    than one in a dense micro-batch (the classic accumulation bug).
    """
    # attention_mask: (B, T) from the collator; the CUDA graph passes none (plain causal attention, graphs.py).
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits  # (B, T, V)
    # Position t predicts token t+1. fp32 for the softmax: bf16 log-probabilities are too coarse.
    # Cost: a (B, T-1, V) fp32 copy of the logits (under fp32 the copy happens in flatten instead,
    # the slice not being contiguous). At the tutorial's 16 rows x 64 tokens and Phi-3's padded
    # vocabulary that is 16 x 63 x 32064 x 4 bytes = 129 MB, beside the 66 MB of bf16 logits.
    logits = logits[:, :-1].float()  # (B, T-1, V)
    targets = batch["labels"][:, 1:]  # (B, T-1)
    # cross_entropy is log_softmax then nll_loss; the backward pass keeps the log-softmax, another
    # (B*(T-1), V) fp32 tensor of the same 129 MB, until the step's backward has run.
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")


def supervised_count(batch: dict) -> torch.Tensor:
    """Positions whose next-token label is supervised: the denominator of the mean loss. (,)"""
    return (batch["labels"][:, 1:] != IGNORE).sum()
