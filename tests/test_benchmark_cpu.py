"""scripts/benchmark_cpu.py prints one table row per (threads, dtype, mode, network); speeds are never
asserted, only that the table has its shape and its numbers parse."""

import pytest

from scripts.benchmark_cpu import (COLUMNS, MAX_WARMUP_ROUNDS, NETWORKS, against, evaluation_pass, main, row_names,
                                   warm_up)


def test_table_has_a_row_per_case_and_numbers_parse(capsys):
    main(["--threads", "1", "--dtypes", "fp32", "--repeats", "1", "--train-batch", "1", "--eval-batch", "1",
          "--num-classes", "10", "--cpu-lrn", "eager",  # the compiled kernels' shapes would compile for a minute
          "--cpu-conv", "direct,winograd"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("CPU: ") and "torch " in lines[0]
    header = lines.index("| " + " | ".join(COLUMNS) + " |")
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[header + 2:]]
    assert len(rows) == 2 * 5  # train and eval; each form with both convolutions, and torchvision
    names = ["grouped (eager LRN)", "grouped (eager LRN, winograd conv)", "towers (eager LRN)",
             "towers (eager LRN, winograd conv)", "torchvision"]
    assert [(r[2], r[3]) for r in rows] == [(m, n) for m in ("train", "eval") for n in names]
    for threads, dtype, _, network, batch, rate, spread, ratio, ahead in rows:
        assert (threads, dtype, batch) == ("1", "fp32", "1")
        low, high = (float(v) for v in spread.split(".."))
        assert 0 < low <= float(rate) <= high
        assert float(ratio) > 0 and (network != "torchvision" or ratio == "1.00")
        assert ahead in ("0/1", "1/1") and (network != "torchvision" or ahead == "0/1")


def test_warm_up_runs_rounds_until_one_faults_in_no_fresh_memory():
    """Every network runs in each warm-up round, and the rounds stop at the first that grew no memory
    (here the third), or after MAX_WARMUP_ROUNDS when every round does."""
    calls = []
    counts = iter([0, 9000, 9000, 12000, 12000, 12100])  # fault counts read before and after each round
    runners = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    assert warm_up(runners, faults=lambda: next(counts)) == 3
    assert calls == ["a", "b"] * 3
    growing = iter(range(0, 10**9, 10**4))
    calls.clear()
    assert warm_up(runners, faults=lambda: next(growing)) == MAX_WARMUP_ROUNDS
    assert calls == ["a", "b"] * MAX_WARMUP_ROUNDS


def test_evaluation_rows_run_as_an_evaluation_pass_and_training_rows_do_not():
    """The eval section keeps the paper's network's bf16 fc weights across forwards, as repro.evaluate's pass
    does; a training step must not (its weights change every step)."""
    from repro.config import ModelConfig
    from repro.model.grouped import AlexNet
    from repro.model.linear import Linear

    fcs = [m for m in AlexNet(config=ModelConfig(num_classes=10)).modules() if isinstance(m, Linear)]
    net = fcs[0]
    with evaluation_pass("train", [net]):
        assert not net.keep_bf16
    with evaluation_pass("eval", [net]):
        assert net.keep_bf16
    assert not net.keep_bf16 and len(fcs) == 3


def test_ratios_are_paired_by_round():
    """Each round's ratio, then their median; a loaded round (the third) slows both sides of its ratio."""
    ours = [10.0, 9.0, 5.0, 9.9, 10.2]
    theirs = [9.0, 9.5, 4.0, 9.0, 10.0]
    assert against(ours, theirs) == ("1.10", "4/5")  # ratios 1.11, 0.95, 1.25, 1.10, 1.02
    assert against(theirs, theirs) == ("1.00", "0/5")
    assert against(ours, None) == ("-", "-")


def test_the_paper_network_gets_a_row_per_lrn_kernel_and_convolution_and_torchvision_one():
    assert row_names(list(NETWORKS), ["eager", "compiled"]) == [
        ("grouped (eager LRN)", "grouped", "eager", "direct"),
        ("grouped (compiled LRN)", "grouped", "compiled", "direct"),
        ("towers (eager LRN)", "towers", "eager", "direct"), ("towers (compiled LRN)", "towers", "compiled", "direct"),
        ("torchvision", "torchvision", "eager", "direct")]
    assert row_names(["grouped", "torchvision"], ["native"], ("direct", "winograd")) == [
        ("grouped (native LRN)", "grouped", "native", "direct"),
        ("grouped (native LRN, winograd conv)", "grouped", "native", "winograd"),
        ("torchvision", "torchvision", "eager", "direct")]


def test_unknown_convolution_and_an_overriding_environment_are_clear_errors(capsys, monkeypatch):
    with pytest.raises(SystemExit):
        main(["--cpu-conv", "fft"])
    assert "--cpu-conv takes direct, winograd; got 'fft'" in capsys.readouterr().err
    monkeypatch.setenv("REPRO_CONV_CPU", "direct")
    with pytest.raises(SystemExit):
        main([])
    assert "REPRO_CONV_CPU is set: it would override --cpu-conv for every row; unset it" in capsys.readouterr().err


def test_unknown_lrn_kernel_and_an_overriding_environment_are_clear_errors(capsys, monkeypatch):
    import pytest

    with pytest.raises(SystemExit):
        main(["--cpu-lrn", "fast"])
    assert "--cpu-lrn takes eager, compiled, native; got 'fast'" in capsys.readouterr().err
    monkeypatch.setenv("REPRO_LRN_CPU", "eager")
    with pytest.raises(SystemExit):
        main([])
    assert "REPRO_LRN_CPU is set: it would override --cpu-lrn for every row; unset it" in capsys.readouterr().err


def test_unknown_dtype_is_a_clear_error(capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["--dtypes", "fp16"])
    assert "--dtypes takes fp32 and/or bf16, got 'fp16'" in capsys.readouterr().err


def test_profile_names_each_network_and_its_operators(capsys):
    # 12 rows: at batch 1 the fully connected layers' products and the SGD update take the first places,
    # and a convolution came 4th to 6th by timing (a 5-row table once had none)
    main(["--profile", "12", "--threads", "1", "--dtypes", "fp32", "--train-batch", "1", "--num-classes", "10",
          "--networks", "grouped", "--cpu-lrn", "eager"])
    out = capsys.readouterr().out
    assert "grouped (eager LRN, winograd conv), one training step, batch 1, fp32, 1 thread(s):" in out
    assert "convolution" in out and "Self CPU" in out


def test_stages_split_both_networks_at_their_convolutions(capsys):
    main(["--stages", "--threads", "1", "--dtypes", "fp32", "--repeats", "1", "--eval-batch", "1",
          "--train-batch", "1", "--num-classes", "10", "--cpu-lrn", "eager"])
    lines = capsys.readouterr().out.splitlines()
    header = "| stage | grouped | torchvision | difference |"
    starts = [i for i, line in enumerate(lines) if line == header]
    assert len(starts) == 2 and lines[starts[0] - 1].startswith("evaluation forward by stage: batch 1, fp32") \
        and lines[starts[1] - 1].startswith("training step (torch.optim.SGD) by stage: batch 1, fp32")
    convs = range(1, 6)
    expected = {
        "eval": [s for i in convs for s in (f"conv{i}", f"after conv{i}")] + ["fully connected"],
        "train": ["before conv1"] + [s for i in convs for s in (f"conv{i} forward", f"after conv{i} forward")]
        + ["fully connected forward", "loss, its gradient, fc8's cast", "fully connected backward"]
        + [s for i in reversed(convs) for s in (f"after conv{i} backward", f"conv{i} backward")]
        + ["rest of the backward", "update (optimizer step)", "after the update"]}
    for start, mode in zip(starts, ("eval", "train")):
        end = next((i for i in range(start + 2, len(lines)) if not lines[i].startswith("|")), len(lines))
        rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[start + 2:end]]
        assert [r[0] for r in rows] == expected[mode] + ["sum of the stages"]
        for stage, ours, theirs, diff in rows:
            # a layer's own work takes measurable time; what runs between layers (a ReLU at batch 1) may print 0.0 ms
            timed = stage.startswith("conv") or stage in ("update (optimizer step)", "fully connected backward")
            assert float(ours) > 0 and float(theirs) > 0 if timed else min(float(ours), float(theirs)) >= 0
            assert abs(float(ours) - float(theirs) - float(diff)) < 0.11
        sums = [sum(float(r[i]) for r in rows[:-1]) for i in (1, 2)]
        assert [float(rows[-1][1]), float(rows[-1][2])] == pytest.approx(sums, abs=0.1 * len(rows))
