"""scripts/benchmark_lrn_cpu.py: one row per (shape, layout) with both kernels' times and their difference;
speeds are never asserted. One small shape (the one tests/test_lrn_cpu.py compiles too, so inductor's
cache serves whichever file runs second)."""

import pytest

from scripts import benchmark_lrn_cpu
from scripts.benchmark_lrn_cpu import COLUMNS, main


def test_table_has_a_row_per_shape_and_layout_and_numbers_parse(capsys, monkeypatch):
    monkeypatch.setattr(benchmark_lrn_cpu, "SHAPES", [("small", 12, 5, 2)])
    monkeypatch.delenv("REPRO_LRN_CPU", raising=False)
    main(["--batch", "4", "--repeats", "1", "--layouts", "channels_last"])
    lines = capsys.readouterr().out.splitlines()
    header = lines.index("| " + " | ".join(COLUMNS) + " |")
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[header + 2:]]
    assert len(rows) == 1
    shape, layout, *times, speedup, errs = rows[0]
    assert (shape, layout) == ("small (4, 12, 5, 5)", "channels_last")
    assert all(float(t) > 0 for t in times) and float(speedup.rstrip("x")) > 0
    assert all(float(e) < 1e-5 for e in errs.split(" / "))  # float32 rounding: the same function


def test_bad_layout_and_an_overriding_environment_are_clear_errors(capsys, monkeypatch):
    with pytest.raises(SystemExit):
        main(["--layouts", "nhwc"])
    assert "--layouts takes nchw, channels_last; got 'nhwc'" in capsys.readouterr().err
    monkeypatch.setenv("REPRO_LRN_CPU", "eager")
    with pytest.raises(SystemExit):
        main([])
    assert "REPRO_LRN_CPU is set" in capsys.readouterr().err
