"""The host's time to draw one micro-batch from the loop's loader, with rows kept as lists of ints
or made tensors once (packing.make_loader). On the CPU: it is host work, whatever the GPU.

    python benchmarks/lab/collate_time.py --tokenizer DIR --dataset FILE --out DIR [--shapes 16x64,16x512]

Draws every micro-batch of an epoch, --epochs times, through a DataLoader as train.fit builds it
(the seeded sampler, the collator; no pinning, which needs a GPU), and reports the mean time a
micro-batch took, each way. Writes DIR/collate_time.json and .md.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: yoda_raw and benchmarks/

import torch  # noqa: E402

from benchmarks import common  # noqa: E402
from yoda_raw.data import load_conversations  # noqa: E402
from yoda_raw.packing import Collator, EpochSampler, build_rows, make_loader  # noqa: E402


def ms_per_batch(loader, epochs: int) -> float:
    batches, start = 0, time.perf_counter()
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        for _ in loader:
            batches += 1
    return (time.perf_counter() - start) / batches * 1e3


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", required=True, help="a tokenizer folder (Phi-3-mini's)")
    parser.add_argument("--dataset", required=True, help="the yoda_sentences JSONL file")
    parser.add_argument("--shapes", default="16x64,16x512", help="ROWSxTOKENS, comma-separated")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    conversations = load_conversations(args.dataset)
    collator, cpu = Collator(tokenizer.pad_token_id), torch.device("cpu")
    results = []
    for shape in args.shapes.split(","):
        batch_size, max_length = (int(n) for n in shape.split("x"))
        rows = build_rows(tokenizer, conversations, max_length)
        sampler = EpochSampler(len(rows), shuffle=True, seed=0)
        as_lists = torch.utils.data.DataLoader(rows, batch_size=batch_size, sampler=sampler, collate_fn=collator)
        as_tensors = make_loader(rows, batch_size, collator, sampler, cpu)
        ms_per_batch(as_lists, 1), ms_per_batch(as_tensors, 1)  # warm-up
        results.append(
            {
                "shape": shape,
                "rows": len(rows),
                "lists_ms": ms_per_batch(as_lists, args.epochs),
                "tensors_ms": ms_per_batch(as_tensors, args.epochs),
            }
        )
    command = "python benchmarks/lab/collate_time.py " + " ".join(argv)
    meta = {
        "command": command,
        "machine": common.device_name(),
        "versions": common.versions(),
        "date": common.now_utc(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "collate_time.json").write_text(json.dumps(meta | {"results": results}, indent=2) + "\n")
    lines = [
        f"`{command}` on {meta['machine']}, {meta['date']}.",
        "",
        "| micro-batch | rows in the epoch | rows as lists, ms a micro-batch | rows as tensors, ms |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['shape']} | {r['rows']} | {r['lists_ms']:.3f} | {r['tensors_ms']:.3f} |" for r in results]
    (args.out / "collate_time.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
