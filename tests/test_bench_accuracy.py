"""ffclip-bench's edit accuracy column: the shapes world's judge on each backend's edits; "-" and the reason
elsewhere."""

import torch

from ffclip.benchmarks import report
from ffclip.benchmarks.runner import Cell, Settings, unjudged_reason
from ffclip.benchmarks.worker import ChunkedEditor, judge_edits
from ffclip.world.captions import SPLITS, all_edit_prompts
from ffclip.world.scenes import render_uint8, sample_scenes


class SceneEditor:
    """An editor of the world that applies every request exactly (each latent is a scene's index); `broken` returns
    the originals unedited, `failing` raises on edits."""

    def __init__(self, broken: bool = False, failing: bool = False):
        self.broken, self.failing = broken, failing
        self.requests = {p: (a, v) for split in SPLITS for p, a, v in all_edit_prompts(split)}
        self.scenes = []
        self.batches = []

    def sample_latents(self, num, seed=0, truncation=1.0):
        self.scenes = sample_scenes(num, seed)
        return torch.arange(num, dtype=torch.float32)[:, None]

    def synthesize(self, latents):
        self.batches.append(len(latents))
        return render_uint8([self.scenes[int(i)] for i in latents[:, 0]])

    def edit(self, latents, prompts):
        if self.failing:
            raise RuntimeError("the engine fell over")
        self.batches.append(len(latents))
        scenes = [self.scenes[int(i)] for i in latents[:, 0]]
        if not self.broken:
            scenes = [s.replace(**dict([self.requests[p]])) for s, p in zip(scenes, prompts)]
        return render_uint8(scenes)


def test_the_judge_scores_exact_edits_full_and_unedited_pictures_zero():
    exact = judge_edits(SceneEditor(), num=4)
    assert exact["type"] == "accuracy" and exact["percent"] == 100.0 and exact["reason"] is None
    assert exact["seconds"] >= 0
    assert judge_edits(SceneEditor(broken=True), num=4)["percent"] == 0.0
    failed = judge_edits(SceneEditor(failing=True), num=2)
    assert failed["percent"] is None and "the engine fell over" in failed["reason"]


def test_the_judge_calls_the_backend_at_its_timed_batch_size():
    editor = SceneEditor()
    assert judge_edits(ChunkedEditor(editor, rows=3), num=4)["percent"] == 100.0  # padding rows are dropped
    assert set(editor.batches) == {3}
    broken = SceneEditor(broken=True)
    assert judge_edits(ChunkedEditor(broken, rows=3), num=4)["percent"] == 0.0


def _settings(preset="world", stages=("edit",), num=32):
    return Settings(preset=preset, device="cpu", stages=stages, backends=("eager",), batches=(1,),
                    precisions=("fp32",), warmup=0, iters=1, budget_s=0.0, accuracy_num=num)


def test_only_the_world_preset_with_the_edit_stage_is_judged():
    assert unjudged_reason(_settings()) is None
    assert "random preset draws other ones" in unjudged_reason(_settings(preset="random"))
    assert "edit stage" in unjudged_reason(_settings(stages=("mapper", "generator")))
    assert unjudged_reason(_settings(num=0)) == "--accuracy-num 0"


def test_other_presets_show_a_dash_and_the_reason():
    row = Cell("edit", "eager", "fp32", 1).row("ok", median_ms=10.0, p90_ms=11.0, p99_ms=12.0, spread=1.1,
                                               unstable=False, n=3, throughput=100.0, memory_mib=1.0,
                                               memory_kind="rss growth", max_abs_err=0.0)
    results = {"format": report.FORMAT, "format_version": report.FORMAT_VERSION, "created": "2026-01-01T00:00:00",
               "settings": {"preset": "random", "device": "cpu", "stages": ["edit"], "warmup": 1, "iters": 3,
                            "budget_s": 1.0},
               "machine": {"cpu": "test cpu", "versions": {}}, "rows": [row],
               "accuracy": {"num": 32, "seed": 0, "split": "held-out", "seconds": {}, "failures": {},
                            "skipped": unjudged_reason(_settings(preset="random"))}}
    markdown = report.markdown(results)
    assert "| edit | eager | fp32 | 1 |" in markdown and markdown.count("| - |") == 2  # % peak and edit acc %
    assert "edit acc %: not judged (the judge reads the shapes world's pictures, and the random preset" in markdown


def test_the_world_preset_is_benchmarked_with_its_trained_weights():
    from ffclip.benchmarks.backends import build_modules
    from ffclip.checkpoints import load_generator, load_mapper

    _, mapper, generator = build_modules("world", torch.device("cpu"))
    for built, shipped in ((mapper, load_mapper(preset="world")), (generator, load_generator(preset="world"))):
        expected = shipped.state_dict()
        assert all(torch.equal(t, expected[k]) for k, t in built.state_dict().items())
