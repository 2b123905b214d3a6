"""Which samples each rank sees: DistributedSampler semantics, defined per global batch."""

import pytest

from bfly.core.config import ConfigError
from bfly.core.data.sampling import StepPlan, eval_shard, rank_micro_batches, steps_per_epoch


def step_sets(n, batch, world, micro, epoch=0, start=0, seed=0):
    """Global batch contents per step, gathered over ranks."""
    plan = StepPlan.make(batch, world, micro)
    per_rank = [list(rank_micro_batches(n, plan, r, seed, epoch, start)) for r in range(world)]
    steps = []
    for s in range(steps_per_epoch(n, batch) - start):
        chunk = slice(s * plan.accum_steps, (s + 1) * plan.accum_steps)
        steps.append(sorted(x.index for r in range(world) for mb in per_rank[r][chunk] for x in mb))
    return steps, per_rank


def test_plan_accumulates_when_the_world_shrinks():
    assert StepPlan.make(16, 2, 8).accum_steps == 1
    assert StepPlan.make(16, 1, 8).accum_steps == 2
    assert StepPlan.make(16, 4, 0).micro_batch == 4


@pytest.mark.parametrize(
    "batch, world, micro, msg",
    [
        (10, 3, 0, "not divisible by the world size 3"),
        (16, 2, 3, "not a multiple of train.micro_batch_size=3"),
        (8, 2, 8, "not a multiple"),
    ],
)
def test_bad_plans_name_the_keys(batch, world, micro, msg):
    with pytest.raises(ConfigError, match=msg):  # a user error: one line, exit status 2
        StepPlan.make(batch, world, micro)


def test_global_batches_do_not_depend_on_world_size_or_accumulation():
    reference, _ = step_sets(100, 12, 1, 0)
    for world, micro in [(2, 0), (3, 0), (2, 3), (1, 4), (4, 3)]:
        assert step_sets(100, 12, world, micro)[0] == reference


def test_ranks_are_disjoint_and_drop_last():
    steps, per_rank = step_sets(100, 12, 2, 0)
    assert len(steps) == 8  # 100 // 12, the incomplete batch is dropped
    seen = [x.index for r in per_rank for mb in r for x in mb]
    assert len(seen) == len(set(seen)) == 96


def test_each_epoch_reshuffles_and_seed_matters():
    a, _ = step_sets(100, 10, 2, 0, epoch=0)
    b, _ = step_sets(100, 10, 2, 0, epoch=1)
    c, _ = step_sets(100, 10, 2, 0, epoch=0, seed=1)
    assert a != b and a != c
    assert a == step_sets(100, 10, 2, 0, epoch=0)[0]


def test_resume_from_a_step_continues_the_same_sequence():
    full, _ = step_sets(100, 10, 2, 0)
    tail, _ = step_sets(100, 10, 2, 0, start=4)
    assert tail == full[4:]


def test_sample_seeds_are_per_sample_not_per_rank():
    _, r2 = step_sets(40, 8, 2, 0)
    _, r1 = step_sets(40, 8, 1, 0)
    seeds2 = {x.index: x.seed for r in r2 for mb in r for x in mb}
    seeds1 = {x.index: x.seed for r in r1 for mb in r for x in mb}
    assert seeds1 == seeds2


@pytest.mark.parametrize("n, world", [(50, 1), (50, 2), (50, 3), (7, 4), (2, 3)])
def test_eval_shards_cover_every_sample_exactly_once(n, world):
    shards = [list(eval_shard(n, r, world)) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n))
