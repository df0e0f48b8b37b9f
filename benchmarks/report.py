"""Render a saved suite (NAME.json from run_all.py) as Markdown tables and plots.

    python benchmarks/report.py benchmarks/results/h200/h200.json --out /tmp/h200   # re-render a suite
    python benchmarks/report.py a/h200.json b/h200.json --out results/h200 --name h200   # several as one

run_all.py calls it after every job; run by hand it re-renders a saved suite without a GPU
(NAME.md, NAME_sweep.png, NAME_memory.png and, with card results, NAME_cards.png into --out, by
default the JSON's folder). Several
suites (parts of one run with `run_all.py --only`) are rendered as one, and written as one NAME.json
too: their results together (a later measurement replaces an earlier one of the same name), each
part's command and date kept. The rules every figure is measured by are in benchmarks/README.md;
the tables only say which figure is which.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from yoda_raw.meter import shown_parts  # noqa: E402

FIGURES_HEADER = (
    "| configuration | rows x tokens | step (s) | tokens/s | supervised tokens/s | MFU | peak allocated (GiB) "
    "| peak reserved (GiB) | device used, NVML (GiB) |\n|---|---|---|---|---|---|---|---|---|"
)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="report.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("suites", nargs="+", help="NAME.json files that run_all.py wrote.")
    parser.add_argument("--out", default=None, help="Folder for NAME.md and the plots (default: the first JSON's).")
    parser.add_argument("--name", default=None, help="Base name of the files (default: the first suite's).")
    parser.add_argument("--no-plots", action="store_true", help="Markdown only.")
    args = parser.parse_args(argv)
    paths = [Path(p) for p in args.suites]
    suite = merge([json.loads(p.read_text()) for p in paths])
    name = args.name or suite.get("name") or paths[0].stem
    out = Path(args.out) if args.out else paths[0].parent
    out.mkdir(parents=True, exist_ok=True)
    if len(paths) > 1:
        (out / f"{name}.json").write_text(json.dumps(suite, indent=1) + "\n")
    write_report(suite, out, name, plots=not args.no_plots)
    print(f"wrote {out / (name + '.md')}")
    return 0


def merge(suites: list[dict]) -> dict:
    """Several suites as one: the first's facts, everyone's results (by name, the later wins),
    commands and dates; failures and skips only of jobs that have no result."""
    if len(suites) == 1:
        return suites[0]
    by_name = {r["name"]: r for suite in suites for r in suite["results"]}
    done = {r.get("job") for r in by_name.values()}
    merged = suites[0] | {
        "results": list(by_name.values()),
        "command": " ; ".join(suite["command"] for suite in suites),
        "date_utc": " ; ".join(suite["date_utc"] for suite in suites),
        "wall_s": sum(suite.get("wall_s", 0) for suite in suites),
        "quick": any(suite["quick"] for suite in suites),
    }
    for key in ("failed", "skipped"):
        merged[key] = [item for suite in suites for item in suite[key] if item["job"] not in done]
    return merged


def write_report(suite: dict, out: Path, name: str, plots: bool = True) -> None:
    suite["comparison"] = comparison(suite["results"])
    (out / f"{name}.md").write_text(markdown(suite, name))
    if plots:
        try:
            write_plots(suite, out, name)
        except ImportError:
            print("matplotlib not installed: no plots", file=sys.stderr)


def by_job(results: list[dict], job: str) -> dict | None:
    return next((r for r in results if r.get("job") == job), None)


LEARNING_BOUND = 0.01  # the fast path's per-step losses within 1% of the eager loop's


def worst_relative_difference(losses: list[float], reference: list[float]) -> float:
    """The largest |loss - reference| / |reference| over the steps: the learning check's measure.

    >>> round(worst_relative_difference([2.0, 1.0], [2.0, 1.01]), 6)
    0.009901
    """
    return max(abs(a - b) / abs(b) for a, b in zip(losses, reference, strict=True))


def learning(results: list[dict]) -> dict | None:
    """Our defaults against the eager loop over the same steps: the worst relative difference of a
    step's loss, and whether it stays within LEARNING_BOUND.

    >>> learning([{"job": "learning-ours", "losses": [2.0, 1.0]}, {"job": "learning-eager", "losses": [2.0, 1.01]}])
    {'steps': 2, 'worst_relative_difference': 0.009901, 'within_bound': True, 'bound': 0.01}
    """
    ours, eager = by_job(results, "learning-ours"), by_job(results, "learning-eager")
    if not (ours and eager and ours.get("losses") and len(ours["losses"]) == len(eager.get("losses") or [])):
        return None
    worst = worst_relative_difference(ours["losses"], eager["losses"])
    return {
        "steps": len(ours["losses"]),
        "worst_relative_difference": round(worst, 6),
        "within_bound": worst <= LEARNING_BOUND,
        "bound": LEARNING_BOUND,
    }


def comparison(results: list[dict]) -> dict:
    """Ours / SFTTrainer at the tutorial's configuration: tokens/s and peak memory ratios."""
    sft = by_job(results, "sft")
    ratios = {}
    for job in ("ours", "ours-tutorial-numerics"):
        ours = by_job(results, job)
        if not (ours and sft):
            continue
        ratios[job] = {
            "tokens_per_s_ratio": round(ours["tokens_per_s"] / sft["tokens_per_s"], 3),
            "step_s_ratio": round(ours["step_s"] / sft["step_s"], 3),
        }
        for key in ("peak_allocated_gib", "peak_reserved_gib", "device_used_gib"):
            if ours.get(key) and sft.get(key):
                ratios[job][key.replace("_gib", "_ratio")] = round(ours[key] / sft[key], 3)
    return ratios


def fmt(value, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}"


def row_of(result: dict, label: str | None = None) -> str:
    c = result["config"]
    mfu = f"{100 * result['mfu']:.1f}%" if result.get("mfu") is not None else "–"
    return (
        f"| {label or result['label']} | {c['rows']} x {c['tokens_per_row']} | {fmt(result['step_s'], 3)} | "
        f"{fmt(result['tokens_per_s'], 0)} | {fmt(result['supervised_tokens_per_s'], 0)} | {mfu} | "
        f"{fmt(result['peak_allocated_gib'])} | {fmt(result['peak_reserved_gib'])} | {fmt(result['device_used_gib'])} |"
    )


def markdown(suite: dict, name: str) -> str:
    results = suite["results"]
    v = suite["versions"]
    peak = next((r["peak_tflops"] for r in results if r.get("peak_tflops")), None)
    lines = [
        f"# yoda_raw benchmarks: {name}",
        "",
        f"Measured {suite['date_utc']} on {suite.get('gpu') or (results[0]['device'] if results else 'a CPU')}"
        + (f" (driver {suite['driver']}, {suite['gpu_memory']})" if suite.get("driver") else "")
        + f"; torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}, accelerate {v['accelerate']}, "
        f"bitsandbytes {v['bitsandbytes']}, trl {v['trl']}; python {v['python']}.",
        "",
        f"Command: `{suite['command']}`"
        + (" (quick mode)" if suite["quick"] else "")
        + f"; the suite took {suite.get('wall_s', 0):.0f} s.",
        "",
        "Model: "
        + (
            "the tiny Phi-3 of `--preset tiny`"
            if suite["preset"] == "tiny"
            else "the Phi-3-mini-4k architecture (3.82B parameters) with random weights"
        )
        + "; LoRA r=8 on o_proj, qkv_proj, gate_up_proj, down_proj; data: "
        + ("the tiny preset's pairs" if suite["preset"] == "tiny" else "the yoda set")
        + ", wrapped-packed into full rows. How each figure is measured (step time, tokens, MFU"
        + (f" against {peak:.0f} TFLOP/s" if peak else "")
        + ", torch's and NVML's memory): benchmarks/README.md, \"How it measures\".",
        "",
    ]
    headline = [r for r in results if r.get("section") == "headline"]
    if headline:
        lines += ["## Ours vs TRL SFTTrainer at the tutorial's configuration", "", FIGURES_HEADER]
        lines += [row_of(r) for r in headline]
        for job, ratio in suite["comparison"].items():
            parts = [f"tokens/s x{ratio['tokens_per_s_ratio']:.2f}"]
            parts += [
                f"{k.replace('_ratio', '').replace('_', ' ')} x{ratio[k]:.2f}"
                for k in ("peak_allocated_ratio", "peak_reserved_ratio", "device_used_ratio")
                if k in ratio
            ]
            lines += ["", f"{by_job(results, job)['label']} / SFTTrainer: " + ", ".join(parts) + "."]
        lines += [""]
    check = learning(results)
    if check:
        verdict = "within" if check["within_bound"] else "NOT within"
        lines += [
            "## The same learning",
            "",
            f"Over the first {check['steps']} steps from the same seed and data, our defaults' per-step losses are "
            f"at most {100 * check['worst_relative_difference']:.3f}% from the eager loop's ({verdict} "
            f"{100 * check['bound']:.0f}%).",
            "",
        ]
    ours = by_job(results, "ours")
    lines += grid_table(results, ours)
    variants = [r for r in results if r.get("section") == "variants"]
    if variants and ours:
        lines += ["## One change at a time from our defaults", "", FIGURES_HEADER]
        lines += [row_of(ours, "our defaults (4-bit, checkpointing, paged 8-bit AdamW, bf16)")]
        lines += [row_of(r) for r in variants] + [""]
    checkpointing = [r for r in results if r.get("section") == "checkpointing"]
    if checkpointing:
        references = [(r, f"{r['label']} (every layer checkpointed)") for r in (ours, by_job(results, "ours-512")) if r]
        lines += ["## What the recompute costs, and what memory buys back", "", FIGURES_HEADER]
        lines += [row_of(r, label) for r, label in references] + [row_of(r) for r in checkpointing] + [""]
    if ours and "activations_at_peak_gib" in (ours.get("memory_breakdown") or {}):
        lines += breakdown_table(ours["memory_breakdown"]) + [""]
    lines += cards_table([r for r in results if r.get("card")], (suite.get("gpu") or "CPU").replace("NVIDIA ", ""))
    if suite["failed"] or suite["skipped"]:
        lines += ["## Not measured", ""]
        lines += [f"- {f['job']}: failed, {f['error']}" for f in suite["failed"]]
        lines += [f"- {s['job']}: skipped, {s['reason']}" for s in suite["skipped"]]
        lines += [""]
    return "\n".join(lines)


def grid_table(results: list[dict], ours: dict | None) -> list[str]:
    grid = {(r["config"]["rows"], r["config"]["tokens_per_row"]): r for r in results if r.get("section") == "grid"}
    if not grid:
        return []
    if ours:
        grid.setdefault((ours["config"]["rows"], ours["config"]["tokens_per_row"]), ours)
    rows = sorted({k[0] for k in grid})
    tokens = sorted({k[1] for k in grid})
    lines = [
        "## Rows x tokens per step (our defaults)",
        "",
        "tokens/s, and peak allocated GiB in brackets; rows per step down, tokens per row across.",
        "",
        "| rows \\ tokens | " + " | ".join(str(t) for t in tokens) + " |",
        "|---|" + "---|" * len(tokens),
    ]
    for r in rows:
        cells = [
            f"{grid[r, t]['tokens_per_s']:,.0f} ({fmt(grid[r, t]['peak_allocated_gib'])})" if (r, t) in grid else ""
            for t in tokens
        ]
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    shared = next((r.get("shared_process") for r in grid.values() if r.get("shared_process")), None)
    if shared:
        lines += [
            "",
            f"Grid points other than 16 x 64 ran in one process ({shared}), the model reloaded and memory "
            "freed before each; `allocated_at_start_gib` in the JSON shows each started clean.",
        ]
    return lines + [""]


def breakdown_table(b: dict) -> list[str]:
    lines = ["## Where the memory goes (ours, tutorial configuration)", "", "| part | GiB | how |", "|---|---|---|"]
    lines += [f"| {label} | {b.get(key, 0.0):.3f} | {how} |" for key, label, how in shown_parts(b)]
    lines += [
        f"| **peak reserved** (= the sum) | **{b['peak_reserved_gib']:.3f}** | torch.cuda.max_memory_reserved |",
        f"| paged optimizer state (unified memory, not in torch's counters) | {b['optimizer_state_paged_gib']:.3f} "
        "| counted |",
    ]
    if b.get("outside_torch_gib") is not None:
        lines += [
            f"| outside torch: CUDA context, paged state, libraries | {b['outside_torch_gib']:.3f} "
            "| NVML used - reserved |",
            f"| **device used (NVML)** | **{b['device_used_gib']:.3f}** | nvidia-ml-py |",
        ]
    verdict = "within" if b.get("adds_up") else "NOT within"
    lines += [
        "",
        "Check: the counted weights and LoRA parameters differ from torch.cuda.memory_allocated() after loading by "
        f"{fmt(b.get('mismatch_after_load_gib'), 3)} GiB, and weights + LoRA + optimizer state differ from it after "
        f"the loop by {fmt(b.get('mismatch_after_loop_gib'), 3)} GiB ({verdict} the tolerance of "
        f"{b['tolerance_gib']} GiB). Gradients are counted whole; at the peak only part of them may exist yet, so "
        "activations may be understated by up to their size.",
    ]
    return lines


CARD_KINDS = {"bf16": "bf16 (compute capability 8.0+)", "fp16": "fp16 (no bf16: a T4 and older cards)"}


def cards_table(cards: list[dict], gpu: str) -> list[str]:
    """One line per card, precision and tokens per row: the most rows measured to fit on `gpu`."""
    if not cards:
        return []
    first = cards[0]["card"]
    lines = [
        "## What fits on a card (Phi-3-mini QLoRA, our defaults)",
        "",
        f"A configuration fits a card when it trains and the most device memory NVML saw in use (loading "
        f"included, sampled every 10 ms) stays at or below the card's size less {first['margin_gib']:g} GiB for the "
        f'display and other programs. Measured on the {gpu} (benchmarks/README.md, "Card budgets"); up to '
        f"{first['max_rows']} rows tried; what fits a smaller card in the same precision is not run again on a larger "
        f"one. tokens/s is the **{gpu}'s** speed at that configuration, not the card's.",
        "",
        "| card | computes in | tokens per row | most rows that fit | device used, NVML (GiB) | fewest rows that "
        f"did not fit | tokens/s on the {gpu} |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(cards, key=lambda r: (r["card"]["precision"], r["card"]["card_gib"], r["card"]["tokens_per_row"])):
        c = r["card"]
        probe, run = run_of(cards, c["precision"], c["tokens_per_row"], c["rows_fit"])
        notes = [note for note, holds in (("the most tried", c["rows_fit"] == c["max_rows"]),
                 ("run on a smaller card", c["rows_fit"] == c.get("rows_known_to_fit"))) if holds]  # fmt: skip
        cells = [
            f"{c['card_gib']:g} GiB",
            CARD_KINDS.get(c["precision"], c["precision"]),
            str(c["tokens_per_row"]),
            (f"{c['rows_fit']}" + (f" ({'; '.join(notes)})" if notes else "")) if c["rows_fit"] else "none",
            fmt(probe.get("device_used_peak_gib")),
            fmt(c["rows_not_fit"]),
            fmt(run.get("tokens_per_s"), 0),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def run_of(cards: list[dict], precision: str, tokens: int, rows: int) -> tuple[dict, dict]:
    """The run of `rows` x `tokens` in `precision` that fitted, on whichever card it ran: its probe
    record and its result ({} and {} when none did)."""
    for r in cards:
        c = r["card"]
        if (c["precision"], c["tokens_per_row"]) != (precision, tokens):
            continue
        for probe in c["probes"]:
            if probe["rows"] == rows and probe["fits"] and r["config"].get("rows") == rows:
                return probe, r
    return {}, {}


def short_table(suite: dict) -> str:
    lines = [f"{'job':32} {'rows x tokens':>14} {'step s':>8} {'tokens/s':>10} {'peak alloc GiB':>15}"]
    for r in suite["results"]:
        c = r["config"]
        lines.append(
            f"{r['name']:32} {c['rows']:>7} x {c['tokens_per_row']:<5} {fmt(r['step_s'], 3):>8} "
            f"{fmt(r['tokens_per_s'], 0):>10} {fmt(r['peak_allocated_gib']):>15}"
        )
    for job, ratio in suite["comparison"].items():
        lines.append(
            f"{job} / sft: tokens/s x{ratio['tokens_per_s_ratio']:.2f}"
            + (f", peak allocated x{ratio['peak_allocated_ratio']:.2f}" if "peak_allocated_ratio" in ratio else "")
        )
    lines += [f"FAILED {f['job']}: {f['error']}" for f in suite["failed"]]
    lines += [f"skipped {s['job']}: {s['reason']}" for s in suite["skipped"]]
    return "\n".join(lines)


def write_plots(suite: dict, out: Path, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = suite["results"]
    grid = [r for r in results if r.get("section") == "grid"] + [r for r in results if r.get("job") == "ours"]
    if grid:
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
        for rows in sorted({r["config"]["rows"] for r in grid}):
            points = sorted(
                ((r["config"]["rows"] * r["config"]["tokens_per_row"], r) for r in grid if r["config"]["rows"] == rows),
                key=lambda point: point[0],
            )
            xs = [x for x, _ in points]
            left.plot(xs, [r["tokens_per_s"] for _, r in points], "o-", label=f"{rows} rows")
            if all(r.get("peak_allocated_gib") is not None for _, r in points):
                right.plot(xs, [r["peak_allocated_gib"] for _, r in points], "o-", label=f"{rows} rows")
        for ax, ylabel in ((left, "tokens/s (non-pad)"), (right, "peak allocated (GiB)")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("tokens per step (rows x tokens per row)")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle(f"yoda_raw, Phi-3-mini QLoRA: rows x tokens sweep ({suite.get('gpu') or 'CPU'})")
        fig.tight_layout()
        fig.savefig(out / f"{name}_sweep.png", dpi=110)
        plt.close(fig)
    ours = by_job(results, "ours")
    breakdown = (ours or {}).get("memory_breakdown") or {}
    if "activations_at_peak_gib" in breakdown:
        memory_by_part(plt, breakdown, by_job(results, "sft"), out / f"{name}_memory.png")
    cards = [r for r in results if r.get("card")]
    if cards:
        what_fits(plt, cards, out / f"{name}_cards.png")


def memory_by_part(plt, breakdown: dict, sft: dict | None, png: Path) -> None:
    """One horizontal bar of the loop's peak memory, part by part (meter.shown_parts) up to
    peak reserved, then what the driver saw beyond torch; SFTTrainer's peak reserved below it."""
    parts = [(label.split(" (")[0], max(breakdown.get(key, 0.0), 0.0)) for key, label, _ in shown_parts(breakdown)]
    if breakdown.get("outside_torch_gib") is not None:
        parts.append(("outside torch: CUDA context, libraries (NVML)", max(breakdown["outside_torch_gib"], 0.0)))
    bars = ["yoda_raw, 16 x 64"]
    if sft and sft.get("peak_reserved_gib"):
        bars.append("SFTTrainer, 16 x 64")
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.9 * len(bars)))
    left = 0.0
    colors = plt.get_cmap("tab10").colors
    for i, (label, value) in enumerate(parts):
        outside = label.startswith("outside torch")
        color = "white" if outside else colors[i % len(colors)]
        ax.barh([bars[0]], [value], left=left, color=color, edgecolor="grey" if outside else None,
                hatch="//" if outside else None, label=f"{label}: {value:.2f}")  # fmt: skip
        left += value
    reserved = breakdown["peak_reserved_gib"]
    ax.axvline(reserved, ymin=0.55 if len(bars) > 1 else 0.1, ymax=0.95, color="black", linewidth=1)
    total = f" {left:.2f} GiB device used" if "outside_torch_gib" in breakdown else f" {left:.2f} GiB"
    ax.text(left, 0, f"{total}\n (peak reserved {reserved:.2f})", va="center")
    if len(bars) > 1:
        ax.barh([bars[1]], [sft["peak_reserved_gib"]], color="grey", label="SFTTrainer's peak reserved")
        ax.text(sft["peak_reserved_gib"], 1, f" {sft['peak_reserved_gib']:.2f} GiB peak reserved", va="center")
    ax.invert_yaxis()  # ours on top
    ax.set_xlim(0, max(left, sft["peak_reserved_gib"] if len(bars) > 1 else 0) * 1.3)
    ax.set_xlabel("GiB")
    ax.set_title("peak memory of a step, by part")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)  # beside, not over, the bars
    fig.savefig(png, dpi=110, bbox_inches="tight")
    plt.close(fig)


def what_fits(plt, cards: list[dict], png: Path) -> None:
    """The most rows of each length that fit on each card size and precision (bench_loop --cards)."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    kinds = sorted({(r["card"]["precision"], r["card"]["card_gib"]) for r in cards})
    rows_fit = {(r["card"]["precision"], r["card"]["card_gib"], r["card"]["tokens_per_row"]): r for r in cards}
    lengths = sorted({r["card"]["tokens_per_row"] for r in cards})
    width = 0.8 / len(lengths)
    for i, tokens in enumerate(lengths):
        xs = [k + width * (i - (len(lengths) - 1) / 2) for k in range(len(kinds))]
        heights = [
            rows_fit[(*kind, tokens)]["card"]["rows_fit"] if (*kind, tokens) in rows_fit else 0 for kind in kinds
        ]
        ax.bar(xs, heights, width=width, label=f"{tokens} tokens per row")
    ax.set_xticks(range(len(kinds)), [f"{gib:g} GiB\n{precision}" for precision, gib in kinds])
    ax.set_ylabel("most rows that fit")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.2)  # headroom: the legend sits above the tallest bars
    ax.set_title("what fits on a card (NVML, measured on one GPU)")
    ax.legend(fontsize=8, loc="upper center", ncol=len(lengths))
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
