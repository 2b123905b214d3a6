"""The node check's verdicts, from the facts each node gathers; the check itself with several local
processes standing for nodes (no SLURM: its tasks' variables are set by hand)."""

import json
import shutil
import socket
import subprocess
import time

import pytest
import torch

from bfly.job import faults, ledger, nodecheck
from bfly.job.nodecheck import Problem

from conftest import PYTHON, REPO, subprocess_env, tiny_overrides

# --- the data root ------------------------------------------------------------------------------------


def test_the_data_digest_changes_with_a_missing_image_or_an_edited_csv_but_not_with_the_cache(tiny_data, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_data, copy)
    same = nodecheck.data_facts(copy)
    assert same == nodecheck.data_facts(tiny_data) | {"root": str(copy)}
    assert same["classes"] == 10
    (copy / ".bfly-cache").mkdir()  # the decode cache is no metadata
    assert nodecheck.data_facts(copy)["digest"] == same["digest"]
    next((copy / "train").rglob("*.jpg")).unlink()
    missing = nodecheck.data_facts(copy)["digest"]
    assert missing != same["digest"]
    with open(copy / "train.csv", "a") as f:
        f.write("\n")
    assert nodecheck.data_facts(copy)["digest"] not in (same["digest"], missing)


def test_an_unreadable_data_root_says_why(tmp_path):
    got = nodecheck.data_facts(tmp_path / "nowhere")
    assert got == {"root": str(tmp_path / "nowhere"), "error": "No such file or directory"}


def data(digest: str | None, error: str | None = None) -> dict:
    return {"root": "/data/b", "error": error, "digest": digest}


def test_a_node_whose_data_differs_from_the_others_is_named():
    facts = {"n1": data("aa"), "n2": data("bb"), "n3": data("aa")}
    assert nodecheck.data_problems(facts, "n1") == [
        Problem("n2", "data root /data/b differs from n1's (metadata digest bb, n1: aa)")
    ]


def test_with_two_nodes_that_differ_the_first_node_is_the_reference():
    facts = {"n1": data("aa"), "n2": data("bb")}
    assert [p.node for p in nodecheck.data_problems(facts, "n1")] == ["n2"]


def test_a_node_that_cannot_read_the_data_root_is_named_with_the_reason():
    facts = {"n1": data("aa"), "n2": data(None, "No such file or directory")}
    assert nodecheck.data_problems(facts, "n1") == [
        Problem("n2", "data root /data/b not readable (No such file or directory)")
    ]


# --- the run directory, versions, clocks ------------------------------------------------------------------


def run_dir(free: int = 10 * 2**30, need: int = 2**30, error: str | None = None) -> dict:
    return {"dir": "runs/x", "error": error, "free": free, "need": need}


def test_a_run_directory_that_is_not_shared_is_named_on_the_node_that_does_not_see_the_first_nodes_token():
    facts = {"n1": run_dir(), "n2": run_dir(), "n3": run_dir()}
    seen = {"n1": ["n1", "n2"], "n2": ["n1", "n2"], "n3": ["n3"]}
    assert nodecheck.run_dir_problems(facts, seen, "n1") == [
        Problem("n3", "run directory runs/x is not the one n1 sees (its token is not there): not shared")
    ]


def test_a_run_directory_without_room_for_the_checkpoints_or_not_writable_is_named():
    facts = {"n1": run_dir(free=2**29), "n2": run_dir(error="Read-only file system")}
    got = nodecheck.run_dir_problems(facts, {"n1": ["n1"], "n2": ["n1", "n2"]}, "n1")
    assert got == [
        Problem("n1", "run directory runs/x: 512 MiB free, checkpoints need about 1024 MiB"),
        Problem("n2", "run directory runs/x not writable (Read-only file system)"),
    ]


def versions(**changes: str) -> dict:
    return {"python": "3.11.7", "torch": "2.5.1", "cuda": "12.4", "nccl": "2.21.5", "bfly": "abc123"} | changes


def test_a_node_with_other_versions_is_named_once_per_version():
    facts = {"n1": versions(), "n2": versions(torch="2.4.0", bfly="def456"), "n3": versions()}
    assert nodecheck.version_problems(facts, "n1") == [
        Problem("n2", "torch 2.4.0 differs from n1's 2.5.1"),
        Problem("n2", "bfly def456 differs from n1's abc123"),
    ]


def test_the_version_most_nodes_have_is_the_reference_even_when_the_first_node_differs():
    facts = {"n1": versions(torch="2.4.0"), "n2": versions(), "n3": versions()}
    assert [p.node for p in nodecheck.version_problems(facts, "n1")] == ["n1"]


def test_clocks_further_apart_than_the_bound_are_named():
    got = nodecheck.clock_problems({"n1": 0.0, "n2": 0.3, "n3": -5.2}, "n1", bound=2.0)
    assert got == [Problem("n3", "clock -5.2 s from n1's (more than 2 s)", hardware=True)]


# --- GPUs ---------------------------------------------------------------------------------------------


def gpu(index: int, free: float = 70, total: float = 80, error: str | None = None, kernel: float = 0.0) -> dict:
    return {"index": index, "error": error, "kernel_error": kernel, "free": free * 2**30, "total": total * 2**30}


def test_gpu_problems_each_in_one_line():
    facts = {
        "expected": 4,
        "gpus": [gpu(0), gpu(1, error="CUDA error: unspecified launch failure"), gpu(2, free=10), gpu(3, kernel=0.5)],
        "nvml": {"skipped": None, "problems": ["GPU 0: 2 uncorrectable ECC error(s) since the driver loaded"]},
    }
    assert [p.text for p in nodecheck.gpu_problems("n1", facts)] == [
        "GPU 1 does not answer a small kernel (CUDA error: unspecified launch failure)",
        "GPU 2: 10.0 of 80.0 GiB free (another process?)",
        "GPU 3 computes a wrong matrix product (relative error 0.5)",
        "GPU 0: 2 uncorrectable ECC error(s) since the driver loaded",
    ]
    assert all(p.hardware for p in nodecheck.gpu_problems("n1", facts))


def test_fewer_gpus_than_the_job_asked_for_is_a_problem_and_a_cpu_node_has_none():
    facts = {"expected": 8, "gpus": [gpu(i) for i in range(7)], "nvml": {"skipped": "NVML health skipped"}}
    assert [p.text for p in nodecheck.gpu_problems("n1", facts)] == ["7 GPU(s) visible, the job asked for 8"]
    assert nodecheck.gpu_problems("n1", None) == []


@pytest.mark.fakecuda
def test_gpu_facts_ask_every_visible_gpu_for_a_kernel_and_its_free_memory():
    from fakecuda import fake_gpu

    with fake_gpu(count=2, free_bytes=2**30, tensors=False):
        moved: list[str] = []
        real_to = torch.Tensor.to

        def to(t, *args, **kwargs):
            moved.append(str(args[0]))
            return real_to(t, "cpu")  # the product runs on the CPU: the fake GPU computes nothing

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch.Tensor, "to", to)
            mp.setattr(torch.Tensor, "cpu", lambda t: t)
            facts = nodecheck.gpu_facts(expected=2)
    assert moved == ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]
    assert [(g["index"], g["error"], g["free"]) for g in facts["gpus"]] == [(0, None, 2**30), (1, None, 2**30)]
    assert facts["gpus"][0]["kernel_error"] < 1e-6
    problems = [p.text for p in nodecheck.gpu_problems("n1", facts)]
    assert problems[:2] == [
        "GPU 0: 1.0 of 141.0 GiB free (another process?)",
        "GPU 1: 1.0 of 141.0 GiB free (another process?)",
    ]


# --- the network --------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8])
def test_ring_rounds_put_every_rank_in_two_pairs_and_no_rank_twice_in_a_round(n):
    rounds = nodecheck.ring_rounds(n)
    if n < 3:
        assert rounds == []
        return
    for pairs in rounds:
        ranks = [r for p in pairs for r in p]
        assert len(ranks) == len(set(ranks))
    counts = [sum(r in p for pairs in rounds for p in pairs) for r in range(n)]
    assert counts == [2] * n and len(rounds) <= 3


def test_a_node_slow_with_both_neighbours_is_named_and_its_neighbours_are_not():
    pairs = {("n1", "n2"): 10e9, ("n2", "n3"): 1e9, ("n3", "n4"): 1.2e9, ("n4", "n1"): 9e9}
    assert nodecheck.slow_nodes(pairs) == {"n3": 1.2e9}
    assert nodecheck.slow_nodes({("n1", "n2"): 1e9}) == {}  # one pair: nothing to compare with


# --- the verdict ----------------------------------------------------------------------------------------


def test_one_line_per_failing_node_and_a_node_is_blamed_only_when_another_passed():
    problems = [Problem("n2", "data root /d not readable (No such file or directory)"), Problem("n2", "clock +9 s")]
    lines, blamed = nodecheck.verdict(problems, ["n1", "n2"])
    assert lines == ["n2: data root /d not readable (No such file or directory); clock +9 s"]
    assert blamed == ["n2"]


def test_the_same_setup_problem_on_every_node_blames_no_node_but_hardware_does():
    everywhere = [Problem("n1", "data root /d not readable"), Problem("n2", "data root /d not readable")]
    assert nodecheck.verdict(everywhere, ["n1", "n2"])[1] == []
    gpu_too = [*everywhere, Problem("n2", "GPU 0 does not answer", hardware=True)]
    assert nodecheck.verdict(gpu_too, ["n1", "n2"])[1] == ["n2"]
    one_node = [Problem("n1", "data root /d not readable")]
    assert nodecheck.verdict(one_node, ["n1"]) == (["n1: data root /d not readable"], [])


def test_a_problem_of_no_one_node_comes_last():
    lines, blamed = nodecheck.verdict([Problem("network", "all-reduce failed"), Problem("n1", "x")], ["n1", "n2"])
    assert lines == ["n1: x", "network: all-reduce failed"] and blamed == ["n1"]


# --- test hooks -----------------------------------------------------------------------------------------


def test_node_faults_apply_to_their_node_only_and_bad_items_are_named():
    text = "n2:data=/tmp/other;n2:version=torch@0.0.1;n1:clock=5;n2:slow=0.5"
    assert faults.parse(text, "n2") == faults.NodeFaults(data="/tmp/other", versions={"torch": "0.0.1"}, slow_s=0.5)
    assert faults.parse(text, "n1").clock_s == 5.0
    with pytest.raises(RuntimeError, match="BFLY_TEST_NODE_FAULT item 'n2:gpu=1'"):
        faults.parse("n2:gpu=1", "n2")


# --- the check, with local processes for nodes ------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_nodes(n: int, args: list[str], fault: str = "") -> tuple[list[subprocess.CompletedProcess], list[float]]:
    """`n` local tasks of one check; their results and the seconds at which each ended (from the first start)."""
    port = free_port()
    procs = []
    start = time.monotonic()
    for rank in range(n):
        env = subprocess_env(
            SLURM_PROCID=str(rank),
            SLURM_NTASKS=str(n),
            SLURMD_NODENAME=f"n{rank + 1}",
            SLURM_JOB_ID="99",
            BFLY_TEST_NODE_FAULT=fault,
        )
        cmd = [PYTHON, "-m", "bfly.nodecheck", "--rdzv", f"127.0.0.1:{port}", *args]
        procs.append(
            subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    ended: dict[int, float] = {}
    while len(ended) < n and time.monotonic() - start < 180:
        ended |= {i: time.monotonic() - start for i, p in enumerate(procs) if i not in ended and p.poll() is not None}
        time.sleep(0.1)
    done = [subprocess.CompletedProcess(p.args, p.wait(timeout=1), *p.communicate()) for p in procs]
    return done, [ended[i] for i in range(n)]


@pytest.mark.slow
def test_three_local_nodes_pass_and_then_a_slow_one_is_named_by_its_pairs(tiny_data, tmp_path):
    args = tiny_overrides(tiny_data, tmp_path / "run")
    done, _ = run_nodes(3, args)
    assert [p.returncode for p in done] == [0, 0, 0], done[0].stderr
    assert "nodes ok: 3/3 in " in done[0].stdout and "all-reduce 3x1 ranks (gloo, 4 MiB)" in done[0].stdout
    assert "ring pairs" in done[0].stdout and not (tmp_path / "run" / ".bfly-nodecheck").exists()
    assert json.loads((tmp_path / "run" / "suspect_nodes.json").read_text())["hosts"]["99"].keys() == {"n1", "n2", "n3"}
    done, ended = run_nodes(3, args, fault="n3:slow=0.3")
    assert [p.returncode for p in done] == [77, 77, 77], done[0].stderr
    assert "bfly.nodecheck: n3: all-reduce bandwidth" in done[0].stderr
    assert "1 of 3 node(s) failed the check" in done[0].stderr and "n3 recorded in" in done[0].stderr
    assert max(ended) < 60, ended
    print(done[0].stdout + done[0].stderr)


def test_run_node_check_false_skips_the_check_and_a_config_error_is_a_user_error(capsys):
    assert nodecheck.main(["run.node_check=false"]) == 0
    assert capsys.readouterr().out == "bfly.nodecheck: skipped (run.node_check=false)\n"
    assert nodecheck.main(["run.node_check=maybe"]) == 2
    assert "bfly.nodecheck: error: run.node_check: expected bool, got str 'maybe'" in capsys.readouterr().err


def test_one_node_alone_checks_its_own_view_and_prints_one_line(tiny_data, tmp_path, capsys, monkeypatch):
    for name in ("SLURM_PROCID", "SLURM_NTASKS", "SLURMD_NODENAME", "BFLY_EXIT_STATUS_DIR"):
        monkeypatch.delenv(name, raising=False)
    assert nodecheck.main(tiny_overrides(tiny_data, tmp_path / "run")) == 0
    out = capsys.readouterr().out
    assert out.startswith("bfly.nodecheck: nodes ok: 1/1 in ") and "all-reduce skipped (one node)" in out
    assert out.count("\n") == 1 and not (tmp_path / "run" / ".bfly-nodecheck").exists()
    assert nodecheck.main(tiny_overrides(tmp_path / "no-data", tmp_path / "run")) == 77
    err = capsys.readouterr().err
    assert f"bfly.nodecheck: {socket.gethostname()}: data root {tmp_path / 'no-data'} not readable (No such file" in err
    assert not (tmp_path / "run" / "suspect_nodes.json").exists()  # one node, a wrong path: no node's fault


@pytest.mark.slow
def test_a_node_that_never_joins_is_named_within_the_minute(tiny_data, tmp_path):
    """Without SLURM's node list the late task is named by its number, and no node is blamed. The task
    that came ends within the minute; the late one ends by itself, before the check's hard deadline."""
    done, ended = run_nodes(2, tiny_overrides(tiny_data, tmp_path / "run"), fault="n2:absent=45")
    assert [p.returncode for p in done] == [77, 77], done[0].stderr + done[1].stderr
    assert (
        "bfly.nodecheck: task 1: did not join the check within 30 s (not started, or cannot reach 127.0.0.1:"
        in done[0].stderr
    )
    assert "bfly.nodecheck: n2: cannot reach the rendezvous 127.0.0.1:" in done[1].stderr  # late: the check is over
    assert "recorded in" not in done[0].stderr and ledger.read(tmp_path / "run") == []
    assert ended[0] < 60, ended
    assert "did not finish within" not in done[1].stderr, done[1].stderr
    print(done[0].stderr + done[1].stderr)
