"""Label plan → shard tasks."""

from __future__ import annotations

from pipeline.config import load_run_config
from pipeline.stages.plan import make_plan, packs, rounds


def test_plan_cuts_batches_into_rounds() -> None:
    cfg = load_run_config(None, ["generate.num_images=1000", "generate.batch_size=256", "generate.shards_per_round=2"])
    tasks = make_plan(cfg, 10)
    assert [t.size for t in tasks] == [256, 256, 256, 232]
    assert [t.round for t in tasks] == [0, 0, 1, 1]
    assert [len(r) for r in rounds(tasks)] == [2, 2]
    assert tasks[1].indices == range(256, 512)
    assert sorted(i for t in tasks for i in t.indices) == list(range(1000))


def test_plan_is_deterministic_and_seeded() -> None:
    a = make_plan(load_run_config(None, ["generate.num_images=64", "generate.batch_size=32"]), 10)
    b = make_plan(load_run_config(None, ["generate.num_images=64", "generate.batch_size=32"]), 10)
    c = make_plan(load_run_config(None, ["generate.num_images=64", "generate.batch_size=32", "seed=1"]), 10)
    assert a == b
    assert a[0].image_seeds != c[0].image_seeds and a[0].batch_seed != c[0].batch_seed
    assert len(set(a[0].image_seeds + a[1].image_seeds)) == 64


def test_image_seeds_do_not_depend_on_the_batch_size() -> None:
    # The same image index gets the same initial-noise seed however the plan is cut.
    a = make_plan(load_run_config(None, ["generate.num_images=64", "generate.batch_size=32"]), 10)
    b = make_plan(load_run_config(None, ["generate.num_images=64", "generate.batch_size=16"]), 10)
    seeds_a = [s for t in a for s in t.image_seeds]
    seeds_b = [s for t in b for s in t.image_seeds]
    assert seeds_a == seeds_b


def test_batch_larger_than_plan() -> None:
    tasks = make_plan(load_run_config(None, ["generate.num_images=20", "generate.batch_size=256"]), 10)
    assert len(tasks) == 1 and tasks[0].size == 20


def test_packs_keep_a_round_and_a_size() -> None:
    # Shards of 256, 256, 256, 256, 232 in rounds of 3: [0, 1, 2] [3, 4]; packs of at most 2.
    cfg = load_run_config(None, ["generate.num_images=1256", "generate.batch_size=256", "generate.shards_per_round=3"])
    tasks = make_plan(cfg, 10)
    assert [[t.index for t in p] for p in packs(tasks, 2)] == [[0, 1], [2], [3], [4]]
    assert [[t.index for t in p] for p in packs(tasks, 4)] == [[0, 1, 2], [3], [4]]
    assert [[t.index for t in p] for p in packs(tasks, 1)] == [[0], [1], [2], [3], [4]]
