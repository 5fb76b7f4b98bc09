"""bench/_timing.py, the timing loop the benchmarks share, and the two small benchmarks that use it."""
import statistics

import torch

import _timing  # bench/ is on sys.path: conftest


def test_rounds_rotate_and_every_timed_step_is_logged():
    calls, logged = [], []

    def arm(name, seconds):
        it = iter(seconds)

        def step():
            calls.append(name)
            return next(it)
        return step

    steppers = {"a": arm("a", [9, 1, 2, 3]), "b": arm("b", [9, 4, 6, 5])}
    times = _timing.time_interleaved(steppers, steps=3, warmup=1, log=lambda r, k, t: logged.append((r, k, t)))
    assert calls == list("ab" + "ab" + "ba" + "ab")
    assert times == {"a": [1, 2, 3], "b": [4, 6, 5]}
    assert logged == [(0, "a", 1), (0, "b", 4), (1, "b", 6), (1, "a", 2), (2, "a", 3), (2, "b", 5)]
    assert _timing.medians(times) == {"a": 2, "b": 5}


def test_drop_path_and_packing_benchmarks_time_every_arm_interleaved(monkeypatch):
    """Tiny configurations of both scripts: every arm timed ``repeats`` times through the shared loop, medians
    of those times."""
    import bench_drop_path
    import bench_packing

    rounds = []
    real = _timing.time_interleaved

    def spy(steppers, steps, warmup, log=None):
        rounds.append((list(steppers), steps, warmup))
        return real(steppers, steps, warmup, log)

    monkeypatch.setattr(_timing, "time_interleaved", spy)
    torch.manual_seed(0)
    packing = bench_packing.run("mae_vit_demo_patch8", [16, 16, 32], 0.75, 3, True)
    drop = bench_drop_path.run("vit_tiny_patch16_224", 32, 2, 0.3, 3)
    assert rounds == [(["packed", "padded", "per_image"], 3, 1),
                      (["none", "timm-linear", "efficient-linear", "timm-uniform", "efficient-uniform"], 3, 1)]
    for res in (packing, drop):
        assert all(len(v) == 3 and min(v) > 0 for v in res["all_s"].values())
        assert res["step_s"] == {k: round(statistics.median(v), 4) for k, v in res["all_s"].items()}
