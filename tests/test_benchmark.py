"""scripts/benchmark.py runs every form and writes its table (timings are not asserted)."""

import json
import math

from scripts.benchmark import main


def test_benchmark_runs_every_form_on_cpu(tmp_path, capsys):
    out = tmp_path / "bench.json"
    md = tmp_path / "bench.md"
    code = main(["--device", "cpu", "--batch-sizes", "2", "--variants", "fp32", "--steps", "1", "--warmup", "0",
                 "--repeats", "1", "--numerics-batch", "2", "--json", str(out), "--markdown", str(md)])
    assert code == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["model"] for r in rows] == ["grouped", "towers", "towers-2proc", "torchvision"]
    assert all(math.isfinite(r["img_per_s"]) and r["img_per_s"] > 0 for r in rows), rows
    notes = json.loads(out.read_text())["notes"]
    assert any(n.startswith("grouped: bf16") for n in notes) and any(n.startswith("torchvision: bf16") for n in notes)
    assert "| towers-2proc b2 fp32 |" in md.read_text()
