"""Tokenized conversations -> training rows of at most max_length tokens; rows -> padded batches.

Two ways to make rows:

- "wrapped" (SFTTrainer's packing_strategy="wrapped", the tutorial's): join every conversation
  into one long stream and cut it every max_length tokens. No padding except in the last row,
  no token thrown away, but a row may begin in the middle of a conversation and end in the
  middle of another. Attention is plain causal across the whole row: a conversation can see the
  end of the one before it. The first token of each row is never predicted (nothing precedes it
  in the row), so one label per row is lost to the cut.
- "none": one conversation per row, cut to max_length when longer (the cut part is lost).

The collator pads a batch of rows to the same length on the right; the loader draws the rows in a
seeded order, epoch by epoch, and collates them into micro-batches.
"""

import itertools
import random
import sys

import torch

from yoda_raw.chat import IGNORE, tokenize_conversations
from yoda_raw.errors import YodaError


def pack_wrapped(examples: list[dict], max_length: int) -> list[dict]:
    """Concatenate examples in order and cut the stream every max_length tokens.

    The last row keeps the remainder, however short. Labels travel with their tokens.

    >>> pack_wrapped([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]},
    ...               {"input_ids": [4, 5], "labels": [-100, 5]}], max_length=2)
    [{'input_ids': [1, 2], 'labels': [-100, 2]},
     {'input_ids': [3, 4], 'labels': [3, -100]},
     {'input_ids': [5], 'labels': [5]}]
    """
    input_ids = [token for example in examples for token in example["input_ids"]]
    labels = [label for example in examples for label in example["labels"]]
    return [
        {"input_ids": input_ids[start : start + max_length], "labels": labels[start : start + max_length]}
        for start in range(0, len(input_ids), max_length)
    ]


def truncate(examples: list[dict], max_length: int) -> tuple[list[dict], int]:
    """One row per example, cut to its first max_length tokens; returns (rows, how many were cut).

    >>> truncate([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4], "labels": [4]}], 2)
    ([{'input_ids': [1, 2], 'labels': [1, 2]}, {'input_ids': [4], 'labels': [4]}], 1)
    """
    rows = [{"input_ids": e["input_ids"][:max_length], "labels": e["labels"][:max_length]} for e in examples]
    n_truncated = sum(len(e["input_ids"]) > max_length for e in examples)
    return rows, n_truncated


def build_rows(
    tokenizer,
    conversations: list[list[dict]],
    max_length: int,
    train_on: str = "assistant",
    packing: str = "wrapped",
    shuffle: bool = False,
    seed: int = 0,
) -> list[dict]:
    """Tokenize conversations and make training rows: the whole data path after loading.

    `shuffle` reorders the conversations (seeded) before packing, so that a row does not always
    join the same neighbours; row order within an epoch is the data loader's business.
    With packing="none", rows cut short and rows left with no supervised token are reported on
    stderr; the latter are dropped (they would add no loss, only cost), as SFTTrainer does.
    """
    if shuffle:
        conversations = list(conversations)
        random.Random(seed).shuffle(conversations)
    examples = tokenize_conversations(tokenizer, conversations, train_on)

    if packing == "wrapped":
        return pack_wrapped(examples, max_length)

    rows, n_truncated = truncate(examples, max_length)
    if n_truncated:
        print(f"truncated {n_truncated} of {len(rows)} conversations to {max_length} tokens", file=sys.stderr)
    kept = [row for row in rows if any(label != IGNORE for label in row["labels"])]
    if len(kept) < len(rows):
        print(f"dropped {len(rows) - len(kept)} rows with no supervised token left after truncation", file=sys.stderr)
    if not kept:
        raise YodaError(f"no row has a supervised token within {max_length} tokens; raise --max-length")
    return kept


def count_tokens(rows: list[dict], pad_to: int | None = None) -> dict[str, int]:
    """Totals over rows: rows, tokens, supervised tokens, and padding if every row is padded to `pad_to`.

    >>> count_tokens([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [4]}], pad_to=3)
    {'rows': 2, 'tokens': 4, 'supervised_tokens': 3, 'padding': 2}
    """
    totals = {
        "rows": len(rows),
        "tokens": sum(len(row["input_ids"]) for row in rows),
        "supervised_tokens": sum(label != IGNORE for row in rows for label in row["labels"]),
    }
    if pad_to is not None:
        totals["padding"] = sum(max(pad_to - len(row["input_ids"]), 0) for row in rows)
    return totals


class Collator:
    """Rows of different lengths -> one batch of LongTensors (B, T), padded on the right.

    Padding gets `pad_id` in input_ids, 0 in attention_mask and -100 in labels, so it is neither
    attended to nor trained on. T is the longest row.

    >>> Collator(pad_id=0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}])
    {'input_ids': tensor([[5, 6, 7],
            [8, 0, 0]]), 'attention_mask': tensor([[1, 1, 1],
            [1, 0, 0]]), 'labels': tensor([[-100,    6,    7],
            [   8, -100, -100]])}

    There is no option to restart position ids at each conversation inside a packed row: wrapped
    rows do not keep conversation boundaries, and SFTTrainer's wrapped packing does not either.
    """

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(row["input_ids"]) for row in rows)
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)  # (B, T)
        labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)  # (B, T)
        for b, row in enumerate(rows):  # a row's values: lists of ints, or tensors (make_loader's)
            n = len(row["input_ids"])
            input_ids[b, :n] = torch.as_tensor(row["input_ids"])
            attention_mask[b, :n] = 1
            labels[b, :n] = torch.as_tensor(row["labels"])
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# --- the loader: rows in a seeded order, collated into micro-batches ---------------------------------


def make_loader(rows: list[dict], batch_size: int, collator: Collator, sampler, device: torch.device):
    """The loop's DataLoader (train.fit)."""
    # Each row becomes tensors once, here, so collating a batch is only copies. From lists, every
    # batch of every epoch would build its tensors int by int again, which for long rows is most of
    # the host's work between two steps: time in which the GPU may be left waiting for the batch.
    rows = [{key: torch.tensor(values) for key, values in row.items()} for row in rows]
    # generator=: each epoch's iterator draws a seed from it instead of from the global RNG that dropout uses,
    # so a run resumed mid-epoch draws the same dropout masks as an uninterrupted one.
    # pin_memory (with non_blocking, make_accelerator): a copy to the GPU from ordinary memory makes
    # the host wait until the GPU has finished all the work queued before it, three waits a step
    # (one per tensor of the batch), and the GPU then idles while the host prepares the next step.
    return torch.utils.data.DataLoader(
        rows,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collator,
        generator=torch.Generator(),
        pin_memory=device.type == "cuda",
    )


class EpochSampler(torch.utils.data.Sampler):
    """Row order for one epoch: a permutation seeded by (seed + epoch), or the dataset order.

    Seeding by epoch makes the order of any epoch reproducible on its own, which is what lets a
    resumed run see exactly the rows an uninterrupted one would. Accelerate calls `set_epoch`.
    """

    def __init__(self, n_rows: int, shuffle: bool, seed: int):
        self.n_rows, self.shuffle, self.seed, self.epoch = n_rows, shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n_rows

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.n_rows))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n_rows, generator=generator).tolist())


def step_batches(loader, start_step: int, total_steps: int, steps_per_epoch: int, grad_accum: int):
    """Each step's micro-batches, from `start_step` to `total_steps`, epoch after epoch: a list of
    `grad_accum` batches, fewer at an epoch's end (none: this process's share of the epoch ran out)."""
    step = start_step
    while step < total_steps:
        epoch = step // steps_per_epoch
        loader.set_epoch(epoch)
        # On resume, skip the micro-batches this epoch already trained on: drawn (collated and copied,
        # a few small token tensors each) and dropped, once per resume. Accelerate's skip_first_batches
        # would copy the batches after them without non_blocking.
        batches = itertools.islice(loader, (step % steps_per_epoch) * grad_accum, None)
        for _ in range(step % steps_per_epoch, min(steps_per_epoch, total_steps - epoch * steps_per_epoch)):
            yield list(itertools.islice(batches, grad_accum))
            step += 1


def unsupervised_batch(collator: Collator, rows: list[dict], device: torch.device) -> dict:
    """One row with every label masked: contributes 0 to the loss and to the gradients."""
    batch = {key: value.to(device) for key, value in collator(rows[:1]).items()}
    batch["labels"] = torch.full_like(batch["labels"], IGNORE)
    return batch
