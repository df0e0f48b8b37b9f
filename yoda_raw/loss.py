"""The loss: next-token cross-entropy, summed over the supervised positions.

Shared by the training loop (train.py) and the held-out evaluation (evaluate.py), so that the
number evaluation reports is the very quantity training minimises.

Two ways to compute it, the same number:
- whole: the model's forward returns the logits of every position, (B, T, V), and cross-entropy
  reads them all. Simple, and what SFTTrainer does. At long rows the logits are the largest tensors
  of the step: with Phi-3's 32,064-entry vocabulary, 16 rows of 512 tokens make 0.5 GB of bf16
  logits, their 1 GB fp32 copy, the 1 GB log-softmax kept for the backward and the gradients of both.
- chunked (--chunked-loss): the forward stops before the LM head and returns the last hidden
  states, (B, T, H), 100 times smaller. The head and cross-entropy then run over `chunk` positions at
  a time (--loss-chunk), each chunk checkpointed: its logits exist only while it is computed, and
  again, recomputed, while its backward runs. One chunk's logits at a time instead of all of them,
  for one more head matmul in the backward. A chunk holds its logits, their fp32 copy and then their
  gradient, about 12 bytes a position and vocabulary entry: where the rest of the step is small (short
  rows), that is its peak, and smaller chunks lower it.
"""

import contextlib

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from yoda_raw.chat import IGNORE


def token_loss_sum(model, batch: dict, chunk: int = 0) -> torch.Tensor:
    """Sum of next-token cross-entropy over the supervised positions of one micro-batch.

    Returning the *sum* (not the mean) is what makes accumulation exact: the step's loss is
    sum over all micro-batches and processes / number of supervised tokens in the step. Averaging
    each micro-batch and then averaging the averages weights a token in a sparse micro-batch more
    than one in a dense micro-batch (the classic accumulation bug).

    `chunk`: positions a chunk of the chunked loss; 0, the whole loss at once.
    """
    targets = batch["labels"][:, 1:]  # (B, T-1): position t predicts token t+1
    # attention_mask: (B, T) from the collator; the CUDA graph passes none (plain causal attention, graphs.py).
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask")}
    if chunk:
        with head_set_aside(model) as head:
            hidden = model(**inputs).logits  # (B, T, H): the last hidden states, the head set aside
        return chunked_cross_entropy(hidden[:, :-1].flatten(0, 1), targets.flatten(), head, chunk)
    logits = model(**inputs).logits  # (B, T, V)
    # fp32 for the softmax: bf16 log-probabilities are too coarse. Cost: a (B, T-1, V) fp32 copy of
    # the logits (under fp32 the copy happens in flatten instead, the slice not being contiguous).
    # At the tutorial's 16 rows x 64 tokens and Phi-3's padded vocabulary that is
    # 16 x 63 x 32064 x 4 bytes = 129 MB, beside the 66 MB of bf16 logits.
    logits = logits[:, :-1].float()  # (B, T-1, V)
    # cross_entropy is log_softmax then nll_loss; the backward pass keeps the log-softmax, another
    # (B*(T-1), V) fp32 tensor of the same 129 MB, until the step's backward has run.
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")


@contextlib.contextmanager
def head_set_aside(model):
    """Inside the block, the model's forward returns the last hidden states where it would return
    the logits: its LM head is replaced by an identity. Yields the head, for the loss to apply."""
    model = getattr(model, "module", model)  # DDP's wrapper holds the model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft's holds the base
    head = base.get_output_embeddings()
    base.set_output_embeddings(torch.nn.Identity())
    try:
        yield head
    finally:
        base.set_output_embeddings(head)


def chunked_cross_entropy(
    hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Linear, chunk: int
) -> torch.Tensor:
    """Sum of cross-entropy of `head(hidden)` against `targets` (-100: no loss), `chunk` positions at a
    time. hidden: (N, H); targets: (N,). Each chunk is checkpointed, so no chunk's logits outlive it."""
    total = torch.zeros((), device=hidden.device)
    for start in range(0, hidden.shape[0], chunk):
        rows = slice(start, start + chunk)
        # use_reentrant=False: the head is frozen, the chunk's hidden states carry the gradient.
        total = total + checkpoint(chunk_loss, hidden[rows], targets[rows], head.weight, head.bias, use_reentrant=False)
    return total


def chunk_loss(hidden, targets, weight, bias) -> torch.Tensor:
    """One chunk: its logits (C, V) in the head's dtype, as the head computes them, then fp32 for
    the softmax; the sum of their cross-entropy."""
    logits = F.linear(hidden.to(weight.dtype), weight, bias).float()  # (C, V)
    return F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")


def supervised_count(batch: dict) -> torch.Tensor:
    """Positions whose next-token label is supervised: the denominator of the mean loss. (,)"""
    return (batch["labels"][:, 1:] != IGNORE).sum()
