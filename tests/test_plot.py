"""metrics.png: the run's loss, tokens/s and memory over steps (yoda_raw/plot.py)."""

import json
import struct

import pytest

from yoda_raw import plot

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path) -> tuple[int, int]:
    """(width, height) from a PNG's header chunk, after checking the signature: a valid PNG's first bytes."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", data[:16]
    return struct.unpack(">II", data[16:24])


def write_metrics(folder, gpu: bool):
    """A metrics.jsonl as a run writes it: a record per logging step, then the end-of-run evaluation."""
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for step in (5, 10, 15):
        record = {"step": step, "loss": 6.0 / step, "tokens_per_s": 900.0 + step, "supervised_tokens_per_s": 400.0}
        if gpu:
            record |= {"peak_allocated_gib": 2.8, "peak_reserved_gib": 3.2, "device_used_gib": 4.6}
        records.append(record)
    records.append({"step": 15, "eval_loss": 0.9, "samples": [{"sentence": "a", "translation": "b"}]})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu-run", "gpu-run"])
def test_the_command_draws_a_png_beside_any_metrics_file(tmp_path, capsys, monkeypatch, gpu):
    """From a folder or the file itself, with or without memory records (a CPU run logs none): a
    whole PNG beside the metrics, and the command says where. The memory panel draws a GPU run's
    three readings and says a CPU run has none: catches a panel left empty (or a misleading note)
    for a GPU run, and lines of zeros for a CPU run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn, close = [], plt.close
    monkeypatch.setattr(plt, "close", drawn.append)  # keep the figure to look at its panels
    folder = write_metrics(tmp_path / "run", gpu)
    try:
        assert plot.main([str(folder)]) == 0
    finally:
        for figure in drawn:
            close(figure)
    memory = drawn[0].axes[2]
    notes = [text.get_text() for text in memory.texts]
    if gpu:
        assert [line.get_label() for line in memory.get_lines()] == [label for _, label in plot.MEMORY_KEYS]
        assert notes == []
    else:
        assert memory.get_lines() == [] and notes == ["no device memory logged (a CPU run logs none)"]
    png = folder / "metrics.png"
    assert capsys.readouterr().out.strip() == f"wrote {png}"
    width, height = png_size(png)
    assert width > 300 and height > 300
    png.unlink()
    monkeypatch.undo()
    assert plot.main([str(folder / "metrics.jsonl")]) == 0 and png_size(png)
    assert not list(folder.glob(".*partial"))


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "not found: give a run's output folder or its metrics.jsonl"),
        ("", "has no logged step yet"),
        ('{"step": 5, "loss": 1.0}\n{"step": 10, "lo', "line 2 is not a metrics record"),
        ("[1, 2]\n", "line 1 is not a metrics record"),
    ],
    ids=["missing", "empty", "cut-off", "not-records"],
)
def test_the_command_refuses_a_bad_metrics_file_in_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "metrics.jsonl"
    if content is not None:
        path.write_text(content)
    assert plot.main([str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "metrics.png").exists()


def test_write_plot_never_fails_the_run(tmp_path, capsys, monkeypatch):
    """At the end of a run a picture that cannot be drawn is one line on stderr, never an exception:
    the adapter is saved before it. Catches an error in drawing that would turn a finished run red."""
    folder = write_metrics(tmp_path / "run", gpu=False)
    assert plot.write_plot(folder) == folder / "metrics.png"
    assert capsys.readouterr().out.strip() == f"plotted loss, tokens/s and memory in {folder / 'metrics.png'}"

    def broken(*args, **kwargs):
        raise RuntimeError("no space left on device")

    monkeypatch.setattr(plot, "draw", broken)
    assert plot.write_plot(folder) is None
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["plot: no metrics.png (no space left on device); the run is saved"]
