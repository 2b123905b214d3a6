"""Train our VGG19 / ResNet50 on the butterfly data, on one process or many.

    python -m bfly.train --config configs/demo_cpu.yaml                     # one process
    torchrun --nproc_per_node=2 -m bfly.train --config configs/demo_cpu.yaml
    torchrun --nproc_per_node=4 -m bfly.train --config configs/resnet50.yaml train.epochs=60
    python -m bfly.train --help                                             # every config key

A run directory (run.dir) holds config.yaml, metrics.jsonl, train.log, attempts.jsonl, last.pt and best.pt.
With run.resume=auto (the default) a run restarted on the same directory continues where its
last checkpoint left off, mid-epoch included. SIGTERM, SIGINT, SIGUSR1 or SIGUSR2 (to a trainer, to
torchrun's agent or to the whole process group) stop the run with a checkpoint at the current step.

Exit status: 0 finished (or a run.stop_after_* budget reached), 75 stopped by a signal with the
checkpoint written (run.stopped_exit_code; run again to resume), 2 a user error (config, data, run
directory, checkpoint: one line names the culprit), 76 a hang (a rank made no progress for
run.hang_timeout_s; it is named and every live process's stacks are in run.dir/hang/), 1 anything else
(a crash, a failed collective).
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from bfly.core import distributed
from bfly.core.config import Config, dump_yaml, load_config, run_dir_of
from bfly.core.data.pil_input import ImageError
from bfly.core.engine import TrainState
from bfly.core.env import DistEnv, dist_env, elastic_error_file
from bfly.core.errors import Failure, first_to_say, one_line, one_line_warnings, recorded, release_frames
from bfly.core.stopping import STOP_SIGNALS, StopRequest, stop_when_parent_dies
from bfly.job import attempts, retry
from bfly.job.args import parse_args
from bfly.job.exits import EXIT_CRASH, EXIT_HANG, EXIT_USER_ERROR, USER_ERRORS, record_exit
from bfly.job.faults import Faults
from bfly.job.watchdog import Heartbeat, Limits, Watchdog, configure_nccl, watched
from bfly.run.outcome import Outcome
from bfly.run.phases import Phases
from bfly.run.rundir import StartupRefused
from bfly.run.runlog import Sink
from bfly.run.training import Harness, rank_tag, train

# An image that cannot be read or decoded, met while training: --check decodes every image beforehand.
CHECK_HINT = "; run `python -m bfly.train --check` to find every such file before a long run"


class HeartbeatPhases(Phases):
    """The run's phases, kept in the watchdog's heartbeat (bfly.job.watchdog): also a component of the run's
    loop, which moves the heartbeat at every step and every batch."""

    def __init__(self, beat: Heartbeat):
        self.beat = beat

    def enter(self, phase: str) -> None:
        self.beat.enter(phase)

    def during(self, phase: str) -> contextlib.AbstractContextManager[None]:
        return self.beat.during(phase)

    def on_run_start(self, state: TrainState) -> None:
        self.beat.step = state.global_step

    def on_step(self, state: TrainState) -> None:
        self.beat.step_done(state.global_step)

    def batches(self, batches: Iterable, split: str) -> Iterable:
        return watched(batches, self.beat) if split == "train" else watched(batches, self.beat, "eval", "eval")


def harness(cfg: Config, env: DistEnv, watch: Watchdog, faults: Faults) -> Harness:
    """What this job lends its run: the watchdog's heartbeat, the attempt's record (attempts.jsonl), the
    restart's line, the test faults; a hang reported to the run's dashboard."""
    beat = watch.beat

    def before_rendezvous(run_dir: Path, device: torch.device) -> None:
        beat.stall_for_test("startup")
        if device.type == "cuda":
            configure_nccl(run_dir, cfg.dist.timeout_s)

    @contextlib.contextmanager
    def attempt_recorded(run_dir: Path, env: DistEnv, device: torch.device, state: TrainState) -> Iterator:
        with attempts.recorded(run_dir, env, device, state, USER_ERRORS) as attempt:
            watch.before_exit.append(lambda line: attempt.end(attempts.HANG, line, state.global_step))
            yield attempt

    def sink_opened(sink: Sink) -> None:
        watch.on_hang.append(lambda line: sink.note_hang(line, EXIT_HANG))

    def error_line(e: BaseException) -> str | None:
        return f"error{rank_tag(env)}: {user_message(e)}" if isinstance(e, (*USER_ERRORS, RuntimeError)) else None

    return Harness(
        phases=HeartbeatPhases(beat),
        components=[faults.component()],
        before_rendezvous=before_rendezvous,
        before_write=faults.before_write,
        restart_line=retry.restart_line(run_dir_of(cfg), blame=env.is_main),
        recorded=attempt_recorded,
        sink_opened=sink_opened,
        error_line=error_line,
    )


def user_message(e: BaseException) -> str:
    return one_line(e) + (CHECK_HINT if isinstance(e, ImageError) else "")


@dataclass(frozen=True)
class Result:
    exit_code: int
    outcome: Outcome | None  # None: the job failed or only printed something
    failure: Failure | None = None  # why the exit status is not 0, for torchrun's summary


def run_job(argv: list[str] | None = None, on_hang: Callable[[str], None] | None = None) -> Result:
    """The command: parse, train, map the outcome and the errors to an exit status (module docstring).
    on_hang: called with the hang line by the watchdog's thread just before it ends this process with
    EXIT_HANG (a launcher that runs the trainer in its own process decides its retry there)."""
    args = parse_args(argv)
    if args.check:
        from bfly.job.preflight import preflight

        return Result(preflight(args.config, args.overrides, args.nproc), None)
    env = dist_env()
    # Before any start-up work, so that a stop signal at any time ends the job cleanly (no traceback).
    stop = StopRequest().install()
    if env.source == "torchrun":
        stop_when_parent_dies()  # the agent's death (kill -9) becomes a SIGTERM: checkpoint and exit
    failed = _Failed(env)
    try:
        cfg = load_config(args.config, args.overrides, warn=env.is_main)
        if args.print_config:
            print(dump_yaml(cfg), end="")
            return Result(0, None)
        # From here on a rank that stops making progress, or cannot honour a stop, is found and ended.
        faults = Faults.requested(env.rank)
        failed.watch = Watchdog.start(
            Heartbeat(env.rank, faults.stall_for_test),
            env,
            Limits.of(cfg.run, cfg.dist.timeout_s),
            run_dir_of(cfg),
            stop.signal_name,
        )
        if on_hang is not None:
            failed.watch.before_exit.append(on_hang)
        outcome = train(cfg, env, stop, harness(cfg, env, failed.watch, faults))
        code = cfg.run.stopped_exit_code if outcome.by_signal else 0
        return Result(code, outcome, Failure(_stopped_line(env, outcome)) if code else None)
    except StartupRefused:
        refused = f"bfly.train{rank_tag(env)}: stopping: rank 0 refused the start (see its error)"
        return Result(EXIT_USER_ERROR, None, Failure(refused, follows=True))
    except USER_ERRORS as e:
        return failed.by_user(e)
    except RuntimeError as e:
        if (result := failed.at_runtime(e)) is None:
            raise
        return result
    except Exception:
        failed.announced = distributed.announce_failure(env)  # a bug: the other ranks name this one
        raise
    finally:
        failed.close()
        stop.uninstall()


class _Failed:
    """How run_job reports a job that failed, and what it leaves to close once the job is over."""

    def __init__(self, env: DistEnv):
        self.env = env
        self.watch: Watchdog | None = None
        self.announced: distributed.Announcement | None = None

    def by_user(self, e: BaseException) -> Result:
        line = f"bfly.train: error{rank_tag(self.env)}: {user_message(e)}"
        release_frames(e)
        # Start-up errors are the same on every rank: the first rank to meet one reports it. Errors met
        # while training (a bad image) are reported by each rank that meets them.
        if distributed.active() or first_to_say(elastic_error_file(), self.env.is_main):
            print(line, file=sys.stderr, flush=True)
        # Now, not at exit: torchrun may end this process while it waits below for the others to read who failed.
        record_exit(EXIT_USER_ERROR)
        # Before the process group closes: the other ranks' next collective fails, and they read who failed.
        self.announced = distributed.announce_failure(self.env)
        return Result(EXIT_USER_ERROR, None, Failure(line))

    def at_runtime(self, e: RuntimeError) -> Result | None:
        """None: not a failed collective, the error goes on up."""
        if self.watch is not None and self.watch.settle():  # a hang was declared: the watchdog ends this process
            return Result(EXIT_HANG, None)
        if not distributed.active():
            return None
        # A collective failed: almost always another rank failed first and printed its own error.
        tag, culprit = rank_tag(self.env), distributed.failed_rank(self.env.rank)
        if culprit is not None and culprit != self.env.rank:
            line = f"bfly.train{tag}: stopping: rank {culprit} failed (see its error)"
        else:
            line = (
                f"bfly.train{tag}: stopping, a collective failed ({one_line(e)[:200]}); "
                "the failing rank's error is printed above"
            )
        print(line, file=sys.stderr, flush=True)
        return Result(EXIT_CRASH, None, Failure(line, follows=culprit is not None))

    def close(self) -> None:
        distributed.shutdown()
        if self.announced:
            self.announced.wait_read()
        if self.watch is not None:
            self.watch.close()


def _stopped_line(env: DistEnv, outcome: Outcome) -> str:
    written = f"checkpoint written to {outcome.checkpoint}" if outcome.checkpoint else "nothing written"
    return f"bfly.train{rank_tag(env)}: stopped by {outcome.stopped_by}: {written}; run again to continue"


def main(argv: list[str] | None = None) -> int:
    return run_job(argv).exit_code


def _exit_of(result: Result) -> tuple[int, Failure | None]:
    return result.exit_code, result.failure


def _command() -> int:
    one_line_warnings()
    code = retry.refused_restart()  # restarted by torchrun after a user error: it would repeat
    if code is None:
        # Under torchrun: what its summary of a failed job shows for this rank.
        code = recorded(lambda: _exit_of(run_job()), elastic_error_file())
    record_exit(code)  # for the launcher's retry decision (bfly.retry)
    # The outcome is decided and written: a signal that arrives while the process exits (torchrun's
    # SIGTERM to the other trainers once one has exited, say) must not turn it into a death by signal.
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    return code


if __name__ == "__main__":
    sys.exit(_command())
