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


def test_impossible_cases_are_clear_errors():
    import pytest
    import torch

    from repro.bench import Case, check_case

    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="CUDA graph needs a CUDA device"):
        check_case(Case("grouped", 2, "bf16", True, "none", graph=True), cpu)
    with pytest.raises(ValueError, match="max-autotune captures its own"):
        check_case(Case("grouped", 2, "bf16", True, "max-autotune", graph=True), torch.device("cuda"))
    with pytest.raises(ValueError, match="not captured"):
        check_case(Case("towers-2proc", 2, graph=True), torch.device("cuda"))
    with pytest.raises(ValueError, match="unknown model"):
        check_case(Case("resnet", 2), cpu)
    check_case(Case("towers", 2, "bf16", True, "default", graph=True), torch.device("cuda"))  # allowed


def test_graph_variants_are_skipped_without_a_gpu(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["--device", "cpu", "--models", "grouped", "--batch-sizes", "2", "--variants", "bf16-cl-graph",
                 "--steps", "1", "--warmup", "0", "--repeats", "1", "--no-numerics", "--json", str(out)])
    assert code == 0
    assert json.loads(out.read_text())["results"] == []
    assert "grouped b2 bf16 CL graph: skipped" in capsys.readouterr().out
