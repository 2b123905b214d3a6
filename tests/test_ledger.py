"""The suspect-node ledger: which nodes a requeued job avoids, and what blames a node."""

import json
import threading

import pytest

from bfly.job import ledger
from bfly.job.ledger import HANG, HARDWARE, NODE_CHECK, Blame, Cap

STRAGGLER = ledger.STRAGGLER  # recorded, never excluding


def blame(node: str, reason: str = HANG, when: str = "") -> Blame:
    return Blame(node, reason, f"{reason} on {node}", "7", 10, None, when)


FOUR = ("n1", "n2", "n3", "n4")

# (ledger, usable nodes, nodes needed, most excluded, user's --exclude, BFLY_EXCLUDE_NODES) -> (excluded, refused)
TABLE = [
    pytest.param([], FOUR, 1, 4, [], [], [], [], id="nothing blamed: nothing excluded"),
    pytest.param([blame("n1")], FOUR, 1, 4, [], [], ["n1"], [], id="a hang excludes its node"),
    pytest.param([blame("n1", HARDWARE)], FOUR, 1, 4, [], [], ["n1"], [], id="a hardware failure excludes"),
    pytest.param([blame("n1", NODE_CHECK)], FOUR, 1, 4, [], [], ["n1"], [], id="a failed node check excludes"),
    pytest.param([blame("n1", STRAGGLER)], FOUR, 1, 4, [], [], [], [], id="a straggler alone excludes nothing"),
    pytest.param([blame("n1"), blame("n1", NODE_CHECK)], FOUR, 1, 4, [], [], ["n1"], [], id="a node blamed twice once"),
    pytest.param([blame("n1")], FOUR, 1, 4, ["n9"], [], ["n9", "n1"], [], id="the user's --exclude is kept"),
    pytest.param([blame("n1")], FOUR, 1, 4, [], ["n4"], ["n4", "n1"], [], id="nodes excluded by hand are added"),
    pytest.param([], FOUR, 4, 4, ["n1"], ["n2"], ["n1", "n2"], [], id="the user's and by-hand ones stay regardless"),
    pytest.param([blame("n1")], ("n1", "n2"), 2, 4, [], [], [], ["n1"], id="never below the job's node count"),
    pytest.param([blame("n1")], ("n1",), 1, 4, [], [], [], ["n1"], id="never the last usable node"),
    pytest.param(
        [blame("n1", when="1"), blame("n2", when="2")],
        ("n1", "n2", "n3"),
        2,
        4,
        [],
        [],
        ["n2"],
        ["n1"],
        id="the most recent blame wins a tight cap",
    ),
    pytest.param(
        [blame("n1"), blame("n2"), blame("n3")], FOUR, 1, 2, [], [], ["n3", "n2"], ["n1"], id="at most N excluded"
    ),
    pytest.param([blame("n1")], FOUR, 1, 0, [], [], [], ["n1"], id="N=0 turns exclusion off"),
    pytest.param([blame("n2")], FOUR, 2, 4, ["n1"], [], ["n1", "n2"], [], id="the user's count against the room"),
    pytest.param([blame("n2")], FOUR, 3, 4, ["n1", "n3"], [], ["n1", "n3"], ["n2"], id="no room left after them"),
]


@pytest.mark.parametrize("entries, usable, needed, most, user, manual, want, refused", TABLE)
def test_which_nodes_a_requeued_job_avoids(entries, usable, needed, most, user, manual, want, refused):
    got = ledger.excluded(entries, Cap(usable, needed, most), user, manual)
    assert list(got.nodes) == want
    assert [b.node for b, _ in got.refused] == refused


def test_the_exclusion_lines_say_which_node_and_why():
    entries = [
        Blame("n1", HANG, "rank 1 hung there at step 4,210", "7", 4210),
        Blame("n2", HANG, "rank 0 hung there at step 9", "7", 9),
    ]
    got = ledger.excluded(entries, Cap(("n1", "n2"), 1, 4), [], [])
    assert got.lines(before=[]) == [
        "excluding n2 from this job: rank 0 hung there at step 9",
        "not excluding n1 (rank 1 hung there at step 4,210): it would leave 0 usable node(s) in the "
        "partition, this job needs 1",
    ]
    assert got.lines(before=["n2"])[0].startswith("not excluding n1")  # n2 was excluded before: no new line


def test_the_ledger_survives_in_the_run_directory_and_concurrent_writers_lose_nothing(tmp_path):
    def add(i: int) -> None:
        ledger.add(tmp_path, [Blame.now(f"n{i}", NODE_CHECK, "failed", "7")])

    threads = [threading.Thread(target=add, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(b.node for b in ledger.read(tmp_path)) == [f"n{i}" for i in range(8)]
    saved = json.loads((tmp_path / ledger.FILE).read_text())
    assert saved["blamed"][0]["reason"] == NODE_CHECK and saved["blamed"][0]["time"]


def test_a_missing_or_broken_ledger_reads_as_empty(tmp_path):
    assert ledger.read(tmp_path) == []
    (tmp_path / ledger.FILE).write_text("{not json")
    assert ledger.read(tmp_path) == []


HANG_LINE = (
    "hang: no rank has made progress for 12 s (limit 5 s); stalled: rank 1 (gpu-07.example, pid 4242) is stopped "
    "(process state T), waiting for data, last step 4210, 12 s since its last progress; stacks of the live "
    "processes in runs/x/hang; ending the job (exit 76)"
)


def test_a_hang_blames_the_node_of_the_stalled_rank():
    (got,) = ledger.from_hang(HANG_LINE, "7", ("gpu-06", "gpu-07"), {})
    assert (got.node, got.reason, got.step, got.host) == ("gpu-07", HANG, 4210, "gpu-07.example")
    assert got.what == "rank 1 hung there at step 4,210"


def test_a_hang_on_a_one_node_job_blames_that_node_whatever_its_host_name():
    (got,) = ledger.from_hang(HANG_LINE, "7", ("n1",), {})
    assert got.node == "n1"


def test_a_hang_maps_host_names_through_what_the_node_check_saw():
    hosts = {"n1": "box-a", "n2": "gpu-07.example"}
    assert [b.node for b in ledger.from_hang(HANG_LINE, "7", ("n1", "n2"), hosts)] == ["n2"]
    ambiguous = {"n1": "gpu-07.example", "n2": "gpu-07.example"}  # every node the same host name
    assert ledger.from_hang(HANG_LINE, "7", ("n1", "n2"), ambiguous) == []


def test_a_hang_on_a_rank_stopped_before_its_first_heartbeat_blames_its_node():
    line = (
        "hang: no rank has made progress for 9 s (limit 5 s); stalled: rank 1 (vm, pid 4242) sent no heartbeat "
        "and is stopped (process state T); stacks of the live processes in runs/x/hang; ending the job (exit 76)"
    )
    (got,) = ledger.from_hang(line, "7", ("n1",), {})
    assert (got.node, got.what, got.step) == ("n1", "rank 1 hung there before its first heartbeat", None)


def test_a_hang_line_without_a_named_host_blames_nobody():
    line = "hang: ...; stalled: rank 1 sent no heartbeat (not started, or cannot reach the store); ending"
    assert ledger.from_hang(line, "7", ("n1", "n2"), {}) == []


def record(rank: int, node: str, error: str | None) -> dict:
    return {"status": 1, "rank": rank, "host": node, "node": node, "error": error}


def test_a_crash_with_a_cuda_error_blames_its_node_only():
    records = [
        record(0, "n1", "bfly.train [rank 0]: stopping: rank 1 failed (see its error)"),
        record(1, "n2", "stopping, a collective failed (CUDA error: uncorrectable ECC error encountered)"),
    ]
    (got,) = ledger.from_crash(records, "7", ("n1", "n2"), 30)
    assert (got.node, got.reason, got.step) == ("n2", HARDWARE, 30)
    assert got.what.startswith("rank 1 failed there: stopping, a collective failed (CUDA error")


def test_an_nccl_error_on_every_node_blames_none_and_a_plain_bug_blames_none():
    everywhere = [record(0, "n1", "NCCL error: remote process exited"), record(1, "n2", "NCCL error: timeout")]
    assert ledger.from_crash(everywhere, "7", ("n1", "n2"), None) == []
    bug = [record(0, "n1", "ZeroDivisionError: division by zero"), record(1, "n2", None)]
    assert ledger.from_crash(bug, "7", ("n1", "n2"), None) == []
    assert [b.node for b in ledger.from_crash(everywhere[:1], "7", ("n1",), None)] == ["n1"]  # one node: it


def test_a_straggler_named_in_this_attempts_log_is_recorded_once_per_node():
    lines = [
        "2026-12-06 07:00:01 warning: rank 1 (gpu-07) is a straggler: 2.1x the other ranks' own work per step for 3",
        "2026-12-06 07:00:09 warning: rank 1 (gpu-07) is a straggler: 2.4x the other ranks' own work per step for 3",
        "2026-12-06 07:00:11 epoch 1/2 step 8/10",
    ]
    (got,) = ledger.from_stragglers(lines, "7", ("gpu-06", "gpu-07"), {})
    assert (got.node, got.reason) == ("gpu-07", ledger.STRAGGLER)
    assert got.what == "rank 1 was a straggler there (2.4x the other ranks' own work per step)"
    assert ledger.excluded([got], Cap(("gpu-06", "gpu-07"), 1, 4), [], []).nodes == ()  # recorded, not excluding
