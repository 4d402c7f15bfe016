"""Progress reporting: bars on terminals only, throttled lines in logs, silence with quiet."""

from __future__ import annotations

import io

from sparsediff import progress
from sparsediff.progress import LineProgress, format_seconds, progress_bar, track


def test_redirected_output_gets_throttled_lines_not_a_line_per_step(capsys, monkeypatch):
    monkeypatch.setenv(progress.INTERVAL_ENV, "3600")  # no periodic line within the test
    with progress_bar(total=800, desc="train-autoencoder") as bar:
        for _ in range(800):
            bar.update()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err  # only the closing line
    assert lines[0].startswith("train-autoencoder: 800/800 (100%)")
    assert "\r" not in err  # no bar redraws in a log


def test_interval_zero_reports_every_update_and_postfix():
    out = io.StringIO()
    bar = LineProgress(total=4, desc="x", interval=0.0, stream=out)
    bar.set_postfix(loss="0.5")
    for _ in range(4):
        bar.update()
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 4  # close() does not repeat the last line
    assert lines[1].startswith("x: 2/4 (50%)") and lines[1].endswith("loss=0.5")


def test_quiet_prints_nothing(capsys):
    with progress_bar(total=10, desc="quiet", quiet=True) as bar:
        bar.update(10)
        bar.set_postfix(a=1)
    assert list(track(range(5), desc="t", quiet=True)) == [0, 1, 2, 3, 4]
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_track_yields_every_item_and_closes(capsys, monkeypatch):
    monkeypatch.setenv(progress.INTERVAL_ENV, "3600")
    assert list(track(iter(range(3)), desc="gen")) == [0, 1, 2]
    assert capsys.readouterr().err.strip().startswith("gen: 3 ")  # unknown total: a count


def test_format_seconds():
    assert format_seconds(None) == "-"
    assert format_seconds(42.4) == "42s"
    assert format_seconds(185) == "3m05s"
    assert format_seconds(7620) == "2h07m"
