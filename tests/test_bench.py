"""ffclip-bench: statistics, comparison of two result files, a tiny end-to-end run, and one-line argument errors."""

import json
import time

import pytest
import torch
from cli_runner import run_bench as _bench_main

from ffclip.benchmarks import report
from ffclip.benchmarks.runner import Cell, Settings, WorkerFailed, plan, run_worker
from ffclip.benchmarks.timing import MAX_WARMUP_CALLS, PeakMemory, percentile, summarize, time_calls
from ffclip.engines import engine_class


def test_percentiles_interpolate_linearly_between_order_statistics():
    samples = [float(x) for x in range(100, 0, -1)]  # 1..100, unsorted
    assert percentile(samples, 50) == pytest.approx(50.5)
    assert percentile(samples, 90) == pytest.approx(90.1)
    assert percentile(samples, 99) == pytest.approx(99.01)
    assert percentile([3.0], 99) == 3.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_summary_is_in_milliseconds():
    stats = summarize([0.001, 0.002, 0.003, 0.004])
    assert stats.n == 4
    assert stats.median_ms == pytest.approx(2.5)
    assert stats.p90_ms == pytest.approx(3.7)
    assert stats.min_ms == pytest.approx(1.0)
    assert stats.mean_ms == pytest.approx(2.5)


FAST = 2**-6  # seconds of a fast call: a power of two, so that the fake clock adds up exactly


class FakeCalls:
    """A function to time on a fake clock: the i-th call (from 1) takes `slow_s`, and compiles when `compiles`, where
    `slow(i)` holds, else takes `fast_s`."""

    def __init__(self, slow, slow_s=1.0, fast_s=FAST, compiles=True):
        self.slow, self.slow_s, self.fast_s, self.compiles = slow, slow_s, fast_s, compiles
        self.now = 0.0
        self.calls = 0
        self.compiled = 0

    def __call__(self):
        self.calls += 1
        slow = self.slow(self.calls)
        self.compiled += slow and self.compiles
        self.now += self.slow_s if slow else self.fast_s

    def clock(self):
        return self.now

    def compilations(self):
        return self.compiled

    def time(self, **options):
        return time_calls(self, torch.device("cpu"), clock=self.clock, compilations=self.compilations, **options)


def test_time_calls_honours_iters_and_the_budget():
    fn = FakeCalls(lambda i: False)
    timing = fn.time(warmup=2, iters=5, budget_s=100.0)
    assert len(timing.samples) == 5 and timing.warmup_calls == 2 and timing.settled and fn.calls == 7
    assert len(fn.time(warmup=0, iters=None, budget_s=0.0, min_iters=3).samples) == 3
    assert len(fn.time(warmup=0, iters=None, budget_s=10.0, max_iters=4).samples) == 4
    budget = FakeCalls(lambda i: False, fast_s=0.25).time(warmup=0, iters=None, budget_s=1.0, min_iters=3)
    assert len(budget.samples) == 4 and budget.warmup_calls == 0 and not budget.settled


def test_warm_up_lasts_until_compilations_are_over():
    # four slow calls (a compilation, then recompilations), then fast ones: none of the slow ones is timed
    fn = FakeCalls(lambda i: i <= 4)
    timing = fn.time(warmup=1, iters=6, budget_s=0.0)
    assert timing.samples == [FAST] * 6
    assert timing.warmup_calls == 6 and timing.settled  # the four slow calls and two that agree
    assert not summarize(timing.samples).unstable
    # a slow first call that compiles nothing (a cold cache) is left out too
    timing = FakeCalls(lambda i: i == 1, compiles=False).time(warmup=1, iters=3, budget_s=0.0)
    assert timing.samples == [FAST] * 3 and timing.warmup_calls == 3
    # a --warmup above the cap is honoured in full
    assert FakeCalls(lambda i: False).time(warmup=25, iters=1, budget_s=0.0).warmup_calls == 25


def test_a_cell_that_never_settles_is_flagged_in_the_report():
    timing = FakeCalls(lambda i: i % 2 == 0).time(warmup=1, iters=20, budget_s=0.0)  # every other call recompiles
    assert timing.warmup_calls == MAX_WARMUP_CALLS and not timing.settled
    stats = summarize(timing.samples)
    assert stats.spread == 1.0 / ((1.0 + FAST) / 2) and not stats.unstable  # half slow: p90 below 2x the median

    stats = summarize(FakeCalls(lambda i: i % 5 == 0).time(warmup=1, iters=20, budget_s=0.0).samples)  # one in five
    assert (stats.median_ms, stats.p90_ms, stats.spread) == (15.625, 1000.0, 64.0) and stats.unstable
    flagged = Cell("generator", "compile", "fp32", 8).row("ok", **stats.to_dict(), throughput=800.0, memory_mib=1.0,
                                                          max_abs_err=0.0)
    steady = _row("generator", "eager", 8, 100.0)
    markdown = report.markdown(_results([flagged, steady]))
    assert "| generator | compile | fp32 | 8 | 15.6 | 1,000 | 1,000 | 64.00 ! |" in markdown
    assert "| generator | eager | fp32 | 8 | 100 | 110 | 120 | 1.10 |" in markdown
    assert "Unstable (p90 above 2x the median): generator compile fp32 batch 8." in markdown


def _wait_until(condition, seconds=120.0):
    """Poll `condition` until it holds; the bound only stops a broken sampler from hanging the test."""
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)
    return condition()


def test_peak_memory_sees_a_transient_allocation_on_the_cpu():
    mib = 256
    with PeakMemory(torch.device("cpu"), interval_s=0.001) as memory:
        block = torch.ones(mib * 2**20 // 4)  # written, so resident
        assert _wait_until(lambda: memory.peak_mib >= mib)  # held until the sampler has seen it
        del block  # freed before the block ends: only the sampler can have seen it
    assert memory.kind == "rss growth"
    assert mib <= memory.peak_mib < mib + 32


def test_plan_skips_what_cannot_run_here_with_a_reason():
    settings = Settings(preset="random", device="cpu", stages=("mapper",), backends=("eager", "tensorrt", "triton"),
                        batches=(1, 8), precisions=("fp32", "fp16"), warmup=1, iters=2, budget_s=1.0)
    runnable, skipped = plan(settings)
    assert runnable == {"eager": [Cell("mapper", "eager", "fp32", 1), Cell("mapper", "eager", "fp32", 8)]}
    assert len(skipped) == 2 * 3 * 2 - 2 and all(r["status"] == "skipped" and r["reason"] for r in skipped)


def _results(rows):
    settings = {"preset": "random", "device": "cpu", "stages": ["mapper", "generator"], "warmup": 1, "iters": 3,
                "budget_s": 1.0}
    machine = {"cpu": "test cpu", "versions": {"torch": "x"}}
    return {"format": report.FORMAT, "format_version": report.FORMAT_VERSION, "created": "2026-01-01T00:00:00",
            "settings": settings, "machine": machine, "rows": rows}


def _row(stage, backend, batch, median=None):
    cell = Cell(stage, backend, "fp32", batch)
    if median is None:
        return cell.row("skipped", "not here")
    return cell.row("ok", n=3, median_ms=median, p90_ms=median * 1.1, p99_ms=median * 1.2, mean_ms=median,
                    min_ms=median, spread=1.1, unstable=False, throughput=batch / median * 1e3, memory_mib=1.0,
                    memory_kind="rss growth", max_abs_err=0.0)


@pytest.fixture
def two_runs(tmp_path):
    a = _results([_row("mapper", "eager", 1, 10.0), _row("generator", "eager", 8, 400.0),
                  _row("mapper", "torchscript", 1, 8.0), _row("generator", "tensorrt", 8)])
    b = _results([_row("mapper", "eager", 1, 5.0), _row("generator", "eager", 8, 600.0),
                  _row("mapper", "onnxruntime", 1, 3.0)])
    paths = tmp_path / "a.json", tmp_path / "b.json"
    for path, data in zip(paths, (a, b)):
        path.write_text(json.dumps(data))
    return paths


def test_compare_gives_b_over_a_for_matching_measured_rows(two_runs, capsys):
    rows = report.compare(*(report.load_results(p) for p in two_runs))
    ratios = {(r["stage"], r["backend"], r["batch"]): r["ratio"] for r in rows}
    assert ratios == {("mapper", "eager", 1): pytest.approx(0.5), ("generator", "eager", 8): pytest.approx(1.5)}

    with pytest.raises(SystemExit) as exit_info:
        _bench_main(["--compare", *map(str, two_runs)])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    assert "0.500" in out and "1.500" in out and "onnxruntime" not in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--backends", "eager,warp"], "unknown --backends value 'warp'; choose from eager,"),
        (["--stages", ""], "empty --stages"),
        (["--batch", "1,0"], "--batch '1,0': expected comma-separated positive integers"),
        (["--batch", "one"], "--batch 'one': expected comma-separated positive integers"),
        (["--precision", "int4"], "unknown --precision value 'int4'"),
        (["--device", "tpu"], "unknown device 'tpu'"),
    ],
)
def test_bad_arguments_give_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _bench_main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ffclip-bench: error: ") and message in err
    assert len(err.splitlines()) == 1


def test_compare_refuses_a_file_that_is_not_a_result(tmp_path, capsys, two_runs):
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"rows": []}))
    with pytest.raises(SystemExit) as exit_info:
        _bench_main(["--compare", str(two_runs[0]), str(other)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a results.json written by ffclip-bench" in err


def test_a_failing_worker_reports_its_last_error_line(tmp_path):
    with pytest.raises(WorkerFailed, match="KeyError: 'no-such-mode'"):
        list(run_worker({"mode": "no-such-mode"}, tmp_path, "bad"))


def test_tiny_run_writes_results_judges_edits_and_lists_unavailable_backends(tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["--preset", "world", "--stages", "mapper,edit", "--batch", "1", "--iters", "2", "--warmup", "1",
            "--device", "cpu", "--backends", "eager,tensorrt,triton", "--precision", "fp32,fp16", "--accuracy-num", "2",
            "--out", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        _bench_main(args)
    assert exit_info.value.code in (0, None), capsys.readouterr().err

    assert {p.name for p in out.iterdir()} == {"results.json", "results.md", "latency.png"}
    assert (out / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = report.load_results(out / "results.json")
    assert results["machine"]["cpu"] and results["machine"]["versions"]["torch"] == torch.__version__.split("+")[0]
    rows = {(r["backend"], r["precision"]): r for r in results["rows"] if r["stage"] == "mapper"}
    assert len(results["rows"]) == 12

    eager = rows["eager", "fp32"]
    assert eager["status"] == "ok" and eager["n"] == 2
    assert eager["max_abs_err"] == 0.0  # the same eager fp32 computation as the reference, in another process
    assert 0 < eager["median_ms"] <= eager["p90_ms"] <= eager["p99_ms"]
    assert eager["throughput"] == pytest.approx(1e3 / eager["median_ms"])
    assert eager["memory_kind"] == "rss growth" and eager["memory_mib"] >= 0
    assert 0 < eager["floor"] < 1e-4  # float32 rounding against float64, no more
    assert eager["warmup_calls"] >= 2 and eager["settled"] and eager["spread"] == eager["p90_ms"] / eager["median_ms"]

    # skipped on the CPU whether or not the tensorrt package imports here
    tensorrt = rows["tensorrt", "fp32"]
    assert tensorrt["status"] == "skipped"
    assert tensorrt["reason"] == engine_class("tensorrt").availability(torch.device("cpu"))
    assert rows["triton", "fp32"]["reason"] == "the triton kernels run in an interpreter on cpu: correct, but not a benchmark"
    assert rows["eager", "fp16"]["status"] == "skipped" and "fp16 on the CPU" in rows["eager", "fp16"]["reason"]

    markdown = (out / "results.md").read_text()
    assert "| mapper | eager | fp32 | 1 |" in markdown and tensorrt["reason"] in markdown

    # the world's judge reads the edits back: a percentage on the edit row, judged once per backend and precision
    edit = next(r for r in results["rows"] if (r["stage"], r["backend"], r["precision"]) == ("edit", "eager", "fp32"))
    # the shipped world weights make about 94% of held-out edits right (docs/world.md); two originals allow a miss
    assert edit["edit_accuracy"] >= 75.0 and eager["edit_accuracy"] is None
    assert 0 < edit["floor"] < 1e-4  # the whole edit in float64
    accuracy = results["accuracy"]
    assert (accuracy["num"], accuracy["split"], accuracy["skipped"], accuracy["failures"]) == (2, "held-out", None, {})
    assert list(accuracy["seconds"]) == ["eager fp32"]
    assert "| edit acc % |" in markdown and "in held-out phrasings" in markdown
    edit_line = next(line for line in markdown.splitlines() if line.startswith("| edit | eager | fp32 | 1 |"))
    assert edit_line.endswith(f"| {edit['edit_accuracy']:.1f} |")
    assert "mapper" in capsys.readouterr().out


def test_progress_counts_every_step_once_and_ends_at_the_total(monkeypatch, capsys):
    from ffclip.benchmarks import runner
    from ffclip.benchmarks.cli import progress_reporter

    def fake_worker(job, folder, name):
        if job["mode"] == "reference":
            yield {"type": "machine", "machine": {}}
        elif job["mode"] == "export":
            raise WorkerFailed("no exporter here")
        else:  # the eager worker reports its first cell, then dies
            yield {"type": "row", "row": Cell(**job["cells"][0]).row("ok")}
            raise WorkerFailed("killed by signal 9")

    monkeypatch.setattr(runner, "run_worker", fake_worker)
    settings = Settings(preset="world", device="cpu", stages=("mapper", "edit"), backends=("eager", "torchscript"),
                        batches=(1, 8), precisions=("fp32",), warmup=0, iters=1, budget_s=0.0, accuracy_num=2)
    with progress_reporter(tty=False) as (start, advance):
        bench = runner.Benchmark(settings, advance)
        start(bench.total_steps)
        rows = bench.run()
    # the reference, one export, and four cells and their judging for each of the two backends
    assert bench.total_steps == 1 + 1 + 2 * (4 + 1)
    assert {r["status"] for r in rows} == {"ok", "error"} and len(rows) == 8
    counted = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[")]
    done = [int(line[1:line.index("/")]) for line in counted]
    assert done == sorted(set(done)) and done[0] > 0  # each count once, rising, none for a step only started
    assert counted[-1].startswith(f"[{bench.total_steps}/{bench.total_steps}] ")


def _bench_nothing(out, *extra):
    """A run with nothing to measure (TensorRT on the CPU): quick, and it still writes its folder."""
    with pytest.raises(SystemExit) as exit_info:
        _bench_main(["--backends", "tensorrt", "--stages", "mapper", "--device", "cpu", "--out", str(out), *extra])
    return exit_info.value.code


def test_out_replaces_only_an_earlier_run_or_an_empty_folder(tmp_path, capsys):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "results.json").write_text('{"mine": 1}')
    assert _bench_nothing(theirs) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ffclip-bench: error: --out ") and len(err.splitlines()) == 1
    assert str(theirs) in err and "--force" in err and "nothing was measured" not in err
    assert (theirs / "results.json").read_text() == '{"mine": 1}'

    (tmp_path / "empty").mkdir()
    for out, extra in ((tmp_path / "empty", ()), (tmp_path / "empty", ()), (theirs, ("--force",))):
        assert _bench_nothing(out, *extra) == 2  # an earlier run's folder is replaced: run twice into "empty"
        assert "nothing was measured" in capsys.readouterr().err
        assert sorted(p.name for p in out.iterdir()) == ["latency.png", "results.json", "results.md"]
        assert report.load_results(out / "results.json")["rows"]
