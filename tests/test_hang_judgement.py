"""The hang judgement (bfly.job.hang.judge) as a table: what one rank knows of every rank's heartbeat ->
nobody stalled, or which rank(s) stalled and how the hang line names them.

No processes, no clock: each scenario is the judging rank's view at one poll. Limits as in the hang
trials: run.hang_timeout_s=5, run.startup_timeout_s=60 (a poll every second; a record that has not
changed for 5 s is frozen). A rank's record carries the limits its own heartbeat states (Heartbeat.limit
and steady_limit, built here from a real Heartbeat), so the warm-up and step-time rules are the real ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from bfly.job.exits import EXIT_HANG
from bfly.job.hang import Seen, View, is_frozen, judge
from bfly.job.heartbeat import STEP_MULTIPLE, WARM_STEPS, Heartbeat, Limits

LIMITS = Limits(hang_s=5, startup_s=60, stop_grace_s=10)
NOW = 10_000.0
STARTED = NOW - 1_000  # the judging watchdog started long ago, unless a scenario says otherwise
STEADY = 5.0  # the judging rank's step limit past its warm-up


def record(
    rank: int,
    phase: str,
    step: int = 10,
    idle: float = 1.0,
    steps: int = 10,
    step_s: float = 0.1,
    host: str = "node-a",
    workers: list | None = None,
) -> dict:
    """A rank's published record, its limits from a Heartbeat with `steps` steps of this job `step_s` apart."""
    beat = Heartbeat(rank)
    beat.phase, beat.step, beat.steps = phase, step, steps
    beat.step_times.extend([step_s] * max(steps - 1, 0))
    rec = {
        "seq": 1,
        "rank": rank,
        "host": host,
        "pid": 100 + rank,
        "step": step,
        "phase": phase,
        "idle": idle,
        "limit": beat.limit(LIMITS),
        "steady": beat.steady_limit(LIMITS),
    }
    return rec | ({"workers": workers} if workers else {})


@dataclass
class Case:
    records: dict[int, dict]  # rank -> its last record
    changed_ago: dict[int, float] = field(default_factory=dict)  # rank -> seconds since it changed (default 0)
    world_size: int = 2
    states: dict[int, str | None] = field(default_factory=dict)  # /proc states of frozen ranks on this host
    started_ago: float = 1_000
    own_steady: float = STEADY
    last_poll_ago: float = 1.0  # the judging rank's previous poll
    judging: int = 0  # the judging rank
    resumed_ago: float | None = None  # the judging rank found its own process had been stopped
    store_answered_ago: float | None = None  # the store last answered (None: at every poll)
    store_host: int | None = 0  # rank 0 serves the store (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1)
    unheard: dict[int, tuple[int, str | None]] = field(default_factory=dict)  # never heard of, on this host

    def view(self) -> View:
        seen = {r: Seen(rec, NOW - self.changed_ago.get(r, 0.0)) for r, rec in self.records.items()}
        return View(
            self.judging,
            self.world_size,
            "node-a",
            seen,
            NOW,
            NOW - self.started_ago,
            self.own_steady,
            self.states,
            "node-a:29500",
            NOW - self.last_poll_ago,
            None if self.resumed_ago is None else NOW - self.resumed_ago,
            None if self.store_answered_ago is None else NOW - self.store_answered_ago,
            self.store_host,
            self.unheard,
        )


# scenario -> (the view, the stalled ranks or None, what the stalled ranks' description contains)
TABLE: dict[str, tuple[Case, tuple[int, ...] | None, list[str]]] = {
    "every rank made progress within its limit": (
        Case({0: record(0, "forward-backward"), 1: record(1, "collective")}),
        None,
        [],
    ),
    "a stopped rank (its record frozen, its process in state T) is named stopped": (
        Case(
            {0: record(0, "collective", idle=20), 1: record(1, "forward-backward", idle=0.5, step=4)},
            changed_ago={1: 20},
            states={1: "T"},
        ),
        (1,),
        [
            "rank 1 (node-a, pid 101) is stopped (process state T), in forward-backward when last heard 20 s ago, "
            "last step 4, 20 s since"
        ],
    ),
    "a frozen rank whose process is gone is named gone": (
        Case({0: record(0, "collective", idle=20), 1: record(1, "collective")}, changed_ago={1: 20}, states={1: None}),
        (1,),
        ["rank 1 (node-a, pid 101) is gone, in collective"],
    ),
    "a frozen zombie is named dead": (
        Case({0: record(0, "collective", idle=20), 1: record(1, "collective")}, changed_ago={1: 20}, states={1: "Z"}),
        (1,),
        ["is dead (zombie) (process state Z)"],
    ),
    "a frozen rank on this host that still runs is not responding": (
        Case({0: record(0, "collective", idle=20), 1: record(1, "collective")}, changed_ago={1: 20}, states={1: "S"}),
        (1,),
        ["is not responding (process state S)"],
    ),
    "a frozen rank on another host is not responding, stopped, dead or unreachable": (
        Case(
            {0: record(0, "collective", idle=20), 1: record(1, "collective", host="node-b")},
            changed_ago={1: 20},
        ),
        (1,),
        ["rank 1 (node-b, pid 101) is unreachable since step 10 (stopped, dead or cut off)"],
    ),
    "the store silent: its host (rank 0, here stopped) is the one frozen rank, named stopped": (
        Case(
            {0: record(0, "collective", idle=0.5, step=6), 1: record(1, "collective", idle=20, step=7)},
            changed_ago={0: 20},
            judging=1,
            store_answered_ago=20,
            states={0: "T"},
        ),
        (0,),
        ["rank 0 (node-a, pid 100), which serves the heartbeat store, is stopped (process state T), in collective"],
    ),
    "the store silent: the other ranks' old records are no evidence against them": (
        Case(
            {
                0: record(0, "forward-backward", idle=0.5, step=6),
                1: record(1, "collective", idle=20, step=7),
                2: record(2, "data", idle=0.5, step=5),
            },
            changed_ago={0: 20, 2: 20},
            world_size=3,
            judging=1,
            store_answered_ago=20,
            states={0: "T"},
        ),
        (0,),
        ["rank 0 (node-a, pid 100), which serves the heartbeat store, is stopped (process state T)"],
    ),
    "the store silent, its host on another node: it is unreachable since its last step": (
        Case(
            {0: record(0, "forward-backward", idle=0.5, step=6, host="node-b"), 1: record(1, "collective", idle=20)},
            changed_ago={0: 20},
            judging=1,
            store_answered_ago=20,
        ),
        (0,),
        ["rank 0 (node-b, pid 100), which serves the heartbeat store, is unreachable since step 6 (stopped, dead"],
    ),
    "the store silent, its host never heard of: held to the step limit, named as the store's host": (
        Case({1: record(1, "collective", idle=20, step=7)}, judging=1, started_ago=30, store_answered_ago=20),
        (0,),
        ["rank 0, which serves the heartbeat store, sent no heartbeat and its store has not answered for 20 s"],
    ),
    "the store answering late but within 3 polls + 2 s: the frozen rank is still the one named": (
        Case(
            {0: record(0, "collective", idle=20), 1: record(1, "forward-backward", idle=0.5, step=4)},
            changed_ago={1: 20},
            states={1: "T"},
            store_answered_ago=3,
        ),
        (1,),
        ["rank 1 (node-a, pid 101) is stopped (process state T)"],
    ),
    "a rank stopped itself since its last progress blames no other rank when it goes on": (
        Case(
            {0: record(0, "collective", idle=0.5), 1: record(1, "forward-backward", idle=160, step=4)},
            changed_ago={0: 160},
            judging=1,
            resumed_ago=2,
            store_answered_ago=160,  # rank 0 ended the job meanwhile: its store is gone
            states={0: None},
        ),
        None,
        [],
    ),
    "a rank stopped itself, its step limit past since it went on without progress, names itself": (
        Case(
            {0: record(0, "collective", idle=0.5), 1: record(1, "forward-backward", idle=160, step=4)},
            changed_ago={0: 160},
            judging=1,
            resumed_ago=STEADY + 1,
            store_answered_ago=160,
            states={0: None},
        ),
        (1,),
        ["rank 1 (node-a, pid 101), in forward-backward, last step 4", "its own process was stopped until 6 s ago"],
    ),
    "a rank stopped itself before its last progress judges as usual": (
        Case(
            {0: record(0, "collective", idle=20), 1: record(1, "forward-backward", idle=0.5, step=4)},
            changed_ago={1: 20},
            states={1: "T"},
            resumed_ago=100,
        ),
        (1,),
        ["rank 1 (node-a, pid 101) is stopped (process state T)"],
    ),
    "a frozen rank within the judging rank's step limit is no hang yet": (
        Case({0: record(0, "collective", idle=3), 1: record(1, "forward-backward")}, changed_ago={1: 6}),
        None,
        [],
    ),
    "a rank busy in its data path is named waiting for data, with its loader workers": (
        Case(
            {
                0: record(0, "collective", idle=8),
                1: record(1, "data", idle=8, workers=[[201, "T"], [202, None]]),
            }
        ),
        (1,),
        ["rank 1 (node-a, pid 101), waiting for data from loader worker(s) pid 201 (stopped), pid 202 (gone)"],
    ),
    "a rank busy in an evaluation past its step limit is named in eval": (
        Case({0: record(0, "collective", idle=8), 1: record(1, "eval", idle=8)}),
        (1,),
        ["rank 1 (node-a, pid 101), in eval, last step 10, 8 s since its last progress"],
    ),
    "an evaluation that moves within the step limit is no hang": (
        Case({0: record(0, "collective", idle=8), 1: record(1, "eval", idle=2)}),
        None,
        [],
    ),
    "a checkpoint write has the start-up limit": (
        Case({0: record(0, "collective", idle=30), 1: record(1, "checkpoint", idle=30)}),
        None,
        [],
    ),
    "a checkpoint write past the start-up limit is named": (
        Case({0: record(0, "collective", idle=70), 1: record(1, "checkpoint", idle=70)}),
        (1,),
        ["rank 1 (node-a, pid 101), in checkpoint, last step 10, 70 s"],
    ),
    "with a frozen peer, a rank in a checkpoint is held to its step limit": (
        Case(
            {0: record(0, "checkpoint", idle=30), 1: record(1, "collective", idle=0.5)},
            changed_ago={1: 30},
            states={1: "T"},
        ),
        (1,),
        ["rank 1 (node-a, pid 101) is stopped (process state T), in collective"],
    ),
    "one rank behind the others, all waiting, is the one named": (
        Case({0: record(0, "collective", idle=8, step=5), 1: record(1, "collective", idle=8, step=4)}),
        (1,),
        ["rank 1 (node-a, pid 101), in collective, last step 4, 8 s"],
    ),
    "all waiting at the same step: every rank is named": (
        Case({0: record(0, "collective", idle=8), 1: record(1, "forward-backward", idle=8)}),
        (0, 1),
        ["rank 0 (node-a, pid 100), in collective", "rank 1 (node-a, pid 101), in forward-backward"],
    ),
    "start-up: a rank not heard of within the start-up limit is no hang": (
        Case({0: record(0, "rendezvous", idle=30, steps=0)}, started_ago=30),
        None,
        [],
    ),
    "start-up: a rank never heard of past the start-up limit sent no heartbeat": (
        Case({0: record(0, "rendezvous", idle=70, steps=0)}, started_ago=70),
        (1,),
        ["rank 1 sent no heartbeat (not started, or cannot reach the rendezvous store at node-a:29500)"],
    ),
    "start-up: a rank never heard of, found on this host through /proc, is named with its pid and state": (
        Case({0: record(0, "rendezvous", idle=70, steps=0)}, started_ago=70, unheard={1: (4242, "T")}),
        (1,),
        ["rank 1 (node-a, pid 4242) sent no heartbeat and is stopped (process state T)"],
    ),
    "a rank stopped before any record of it arrived is held to the judging rank's step limit": (
        Case({0: record(0, "collective", idle=6)}, started_ago=20, unheard={1: (4242, "T")}),
        (1,),
        ["rank 1 (node-a, pid 4242) sent no heartbeat and is stopped (process state T)"],
    ),
    "a rank never heard of and not stopped keeps the start-up limit while the others train": (
        Case({0: record(0, "collective", idle=6)}, started_ago=20, unheard={1: (4242, "S")}),
        None,
        [],
    ),
    "start-up: a rank stopped before any record of it arrived keeps the start-up limit in the warm-up": (
        Case({0: record(0, "collective", idle=6, steps=1)}, started_ago=20, own_steady=60, unheard={1: (4242, "T")}),
        None,
        [],
    ),
    "start-up: a rank that has not reached the rendezvous past the start-up limit is named": (
        Case({0: record(0, "rendezvous", idle=70, steps=0), 1: record(1, "startup", idle=70, steps=0)}),
        (1,),
        ["rank 1 (node-a, pid 101), has not reached the rendezvous (start-up), last step 10, 70 s"],
    ),
    "start-up: every rank in the rendezvous past the start-up limit": (
        Case({0: record(0, "rendezvous", idle=70, steps=0), 1: record(1, "rendezvous", idle=70, steps=0)}),
        (0, 1),
        ["rank 1 (node-a, pid 101), in the rendezvous"],
    ),
    "warm-up: the first steps (compiling) keep the start-up limit": (
        Case({0: record(0, "forward-backward", idle=40, steps=0), 1: record(1, "collective", idle=40, steps=0)}),
        None,
        [],
    ),
    f"warm-up: step {WARM_STEPS} of the job still has the start-up limit": (
        Case(
            {
                0: record(0, "forward-backward", idle=40, steps=WARM_STEPS - 1),
                1: record(1, "collective", idle=40, steps=WARM_STEPS - 1),
            }
        ),
        None,
        [],
    ),
    "past the warm-up, the same pause is a hang": (
        Case(
            {
                0: record(0, "forward-backward", idle=40, steps=WARM_STEPS),
                1: record(1, "collective", idle=40, steps=WARM_STEPS),
            }
        ),
        (0, 1),
        ["rank 0 (node-a, pid 100), in forward-backward", "rank 1 (node-a, pid 101), in collective"],
    ),
    f"slow steps: {STEP_MULTIPLE} x the median step time is the limit when larger": (
        Case({0: record(0, "forward-backward", idle=8, step_s=1.0), 1: record(1, "collective", idle=8, step_s=1.0)}),
        None,
        [],
    ),
    "a whole job resumed after a suspension, at its first poll (every record old at once): no hang": (
        Case(
            {0: record(0, "collective", idle=300), 1: record(1, "forward-backward", idle=0.5)},
            changed_ago={1: 300},
            states={1: "R"},
            last_poll_ago=300,
        ),
        None,
        [],
    ),
    "a whole job resumed after a suspension, at its next poll (the records fresh): no hang": (
        Case({0: record(0, "forward-backward", idle=0.2), 1: record(1, "forward-backward", idle=0.3)}),
        None,
        [],
    ),
    "the judging rank's own stale record is never frozen: it is named busy, not as not responding": (
        Case({0: record(0, "data", idle=2), 1: record(1, "collective", idle=8)}, changed_ago={0: 20}),
        (0,),
        ["rank 0 (node-a, pid 100), waiting for data, last step 10, 22 s since its last progress"],
    ),
}


@pytest.mark.parametrize("scenario", list(TABLE))
def test_the_judgement_of_each_scenario(scenario):
    case, stalled, described = TABLE[scenario]
    verdict = judge(case.view(), LIMITS)
    if stalled is None:
        assert verdict is None, verdict
        return
    assert verdict is not None
    assert verdict.stalled == stalled
    assert re.findall(r"\brank (\d+)", verdict.named) == [str(r) for r in stalled]  # named: these, no other
    for text in described:
        assert text in verdict.named, f"{text!r} not in {verdict.named!r}"


def test_the_hang_line_names_the_stalled_ranks_the_limit_and_the_stacks_folder():
    case, _, _ = TABLE["a stopped rank (its record frozen, its process in state T) is named stopped"]
    verdict = judge(case.view(), LIMITS)
    assert verdict is not None
    assert verdict.line(Path("/runs/a/hang"), hint="a hint") == (
        "hang: no rank has made progress for 20 s (limit 5 s); stalled: rank 1 (node-a, pid 101) is stopped "
        "(process state T), in forward-backward when last heard 20 s ago, last step 4, 20 s since its last "
        "progress; stacks of the live "
        f"processes in /runs/a/hang; ending the job (exit {EXIT_HANG})"
    )


def test_a_start_up_hang_carries_the_restart_hint_and_a_training_one_does_not():
    startup, _, _ = TABLE["start-up: a rank never heard of past the start-up limit sent no heartbeat"]
    training, _, _ = TABLE["one rank behind the others, all waiting, is the one named"]
    assert judge(startup.view(), LIMITS).line(Path("h"), "export X").endswith("; export X")  # type: ignore[union-attr]
    assert "export X" not in judge(training.view(), LIMITS).line(Path("h"), "export X")  # type: ignore[union-attr]


def test_the_same_old_records_are_a_hang_when_the_judging_rank_polled_on_time():
    resumed, _, _ = TABLE[
        "a whole job resumed after a suspension, at its first poll (every record old at once): no hang"
    ]
    case = replace(resumed, last_poll_ago=3 * LIMITS.poll_s + 2)  # late, but not as late as a stopped process
    verdict = judge(case.view(), LIMITS)
    assert verdict is not None and verdict.stalled == (1,)
    assert "is not responding (process state R)" in verdict.named


def test_no_hang_is_judged_when_hang_detection_is_off():
    case, _, _ = TABLE["one rank behind the others, all waiting, is the one named"]
    assert judge(case.view(), Limits(hang_s=0, startup_s=60, stop_grace_s=10)) is None


def test_a_record_is_frozen_after_three_polls_and_two_seconds_without_change():
    case = Case({0: record(0, "collective"), 1: record(1, "collective")}, changed_ago={1: 3 * LIMITS.poll_s + 2})
    assert not is_frozen(case.view(), 1, LIMITS)
    case.changed_ago[1] += 0.1
    assert is_frozen(case.view(), 1, LIMITS)
    assert not is_frozen(case.view(), 0, LIMITS)  # the judging rank


def test_the_cause_names_the_stalled_rank_its_host_and_step_for_the_restart_line():
    stopped, _, _ = TABLE["a stopped rank (its record frozen, its process in state T) is named stopped"]
    store, _, _ = TABLE["the store silent, its host on another node: it is unreachable since its last step"]
    everyone, _, _ = TABLE["all waiting at the same step: every rank is named"]
    never, _, _ = TABLE["start-up: a rank never heard of past the start-up limit sent no heartbeat"]
    assert judge(stopped.view(), LIMITS).cause == "hang on rank 1 (node-a) at step 4"  # type: ignore[union-attr]
    assert judge(store.view(), LIMITS).cause == "hang on rank 0 (node-b) at step 6"  # type: ignore[union-attr]
    assert judge(everyone.view(), LIMITS).cause == "hang on ranks 0, 1 (node-a) at step 10"  # type: ignore[union-attr]
    assert judge(never.view(), LIMITS).cause == "hang on rank 1 in start-up"  # type: ignore[union-attr]
    early, _, _ = TABLE["a rank stopped before any record of it arrived is held to the judging rank's step limit"]
    silent, _, _ = TABLE["the store silent, its host never heard of: held to the step limit, named as the store's host"]
    for case, cause in ((early, "hang on rank 1 (node-a)"), (silent, "hang on rank 0")):
        verdict = judge(case.view(), LIMITS)
        assert verdict is not None and (verdict.cause, verdict.startup) == (cause, False)  # no start-up hint
