"""The documentation stays true to the code: docs/options.md is generated from config.py's fields,
the README stays a five-minute read, and every file the README and docs/ point to exists."""

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
DOCS += [ROOT / "benchmarks" / "lab" / "README.md"]


def test_options_page_is_the_generators_output():
    """Catches an option added, renamed or re-documented in config.py without the page following."""
    spec = importlib.util.spec_from_file_location("make_options", ROOT / "docs" / "make_options.py")
    make_options = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_options)
    page = (ROOT / "docs" / "options.md").read_text(encoding="utf-8")
    assert page == make_options.render(), (
        "docs/options.md is stale: regenerate it with `python docs/make_options.py > docs/options.md`"
    )


def test_readme_is_a_short_read():
    size = len((ROOT / "README.md").read_bytes())
    assert size < 15_000, f"README.md is {size:,} bytes; keep it under 15,000 and move detail to docs/"


def test_every_local_link_and_cited_path_exists():
    """Markdown links to local files, and backticked paths into benchmarks/ or docs/ (the results
    folder a figure cites, a page), all exist. Catches a file moved or a results folder pruned while
    a page still points to it."""
    missing = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
        targets = [(doc.parent / link) for link in links if "://" not in link and not link.startswith("mailto:")]
        cited = re.findall(r"`((?:benchmarks|docs)/[\w./-]*[\w/])`", text)
        targets += [ROOT / path for path in cited if "*" not in path]
        gone = [t for t in targets if not t.resolve().exists()]
        missing += [f"{doc.relative_to(ROOT)} -> {t.resolve().relative_to(ROOT)}" for t in gone]
    assert not missing, "pointers to nothing:\n" + "\n".join(missing)
