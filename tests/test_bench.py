"""ffclip-bench: statistics, comparison of two result files, a tiny end-to-end run, and one-line argument errors."""

import json
import time

import pytest
import torch
from cli_runner import run_bench as _bench_main

from ffclip.benchmarks import report
from ffclip.benchmarks.backends import skip_reason
from ffclip.benchmarks.runner import Cell, Settings, WorkerFailed, plan, run_worker
from ffclip.benchmarks.timing import PeakMemory, percentile, summarize, time_calls


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


def test_time_calls_honours_iters_and_the_budget():
    calls = []
    fn = lambda: calls.append(1)  # noqa: E731
    cpu = torch.device("cpu")
    assert len(time_calls(fn, cpu, warmup=2, iters=5, budget_s=100.0)) == 5
    assert len(calls) == 7
    assert len(time_calls(fn, cpu, warmup=0, iters=None, budget_s=0.0, min_iters=3)) == 3
    assert len(time_calls(fn, cpu, warmup=0, iters=None, budget_s=10.0, max_iters=4)) == 4


def test_peak_memory_sees_a_transient_allocation_on_the_cpu():
    with PeakMemory(torch.device("cpu"), interval_s=0.001) as memory:
        block = torch.ones(64 * 2**20)  # 256 MiB written, then freed
        time.sleep(0.05)
        del block
    assert memory.kind == "rss growth"
    assert memory.peak_mib >= 200


def test_plan_skips_what_cannot_run_here_with_a_reason():
    settings = Settings(preset="random", device="cpu", stages=("mapper",), backends=("eager", "tensorrt", "triton"),
                        batches=(1, 8), precisions=("fp32", "fp16"), warmup=1, iters=2, budget_s=1.0)
    runnable, skipped = plan(settings)
    assert runnable == {"eager": [Cell("mapper", "eager", "fp32", 1), Cell("mapper", "eager", "fp32", 8)]}
    assert len(skipped) == 2 * 3 * 2 - 2 and all(r["status"] == "skipped" and r["reason"] for r in skipped)


def test_openvino_is_skipped_where_the_exporter_builds_no_openvino_files():
    from ffclip.export.openvino_export import openvino_skip_reason

    cpu = torch.device("cpu")
    assert skip_reason("openvino", "bf16", cpu) == openvino_skip_reason("bf16")
    assert skip_reason("openvino", "fp16", cpu) is not None


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
                    min_ms=median, throughput=batch / median * 1e3, memory_mib=1.0, memory_kind="rss growth",
                    max_abs_err=0.0)


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
        (["--precision", "int8"], "unknown --precision value 'int8'"),
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
    assert eager["floor"] is not None

    # skipped on the CPU whether or not the tensorrt package imports here
    tensorrt = rows["tensorrt", "fp32"]
    assert tensorrt["status"] == "skipped"
    assert tensorrt["reason"] in ("TensorRT is not installed", "TensorRT needs a CUDA device")
    assert rows["triton", "fp32"]["reason"] == "no CUDA device; the Triton interpreter is not a benchmark"
    assert rows["eager", "fp16"]["status"] == "skipped" and "fp16 on the CPU" in rows["eager", "fp16"]["reason"]

    markdown = (out / "results.md").read_text()
    assert "| mapper | eager | fp32 | 1 |" in markdown and tensorrt["reason"] in markdown

    # the world's judge reads the edits back: a percentage on the edit row, judged once per backend and precision
    edit = next(r for r in results["rows"] if (r["stage"], r["backend"], r["precision"]) == ("edit", "eager", "fp32"))
    assert 0.0 <= edit["edit_accuracy"] <= 100.0 and eager["edit_accuracy"] is None
    assert edit["floor"] is not None  # the whole edit in float64
    accuracy = results["accuracy"]
    assert (accuracy["num"], accuracy["split"], accuracy["skipped"], accuracy["failures"]) == (2, "held-out", None, {})
    assert list(accuracy["seconds"]) == ["eager fp32"]
    assert "| edit acc % |" in markdown and "in held-out phrasings" in markdown
    edit_line = next(line for line in markdown.splitlines() if line.startswith("| edit | eager | fp32 | 1 |"))
    assert edit_line.endswith(f"| {edit['edit_accuracy']:.1f} |")
    assert "mapper" in capsys.readouterr().out
