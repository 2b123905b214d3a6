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

import argparse
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from bfly.core import checkpoint as ckpt, distributed
from bfly.core.config import Config, ConfigError, dump_yaml, help_text, load_config, run_dir_of
from bfly.core.data.metadata import DataError, load_metadata
from bfly.core.data.pil_input import ImageError
from bfly.core.engine import StepHooks, TrainState, device_clock, evaluate, new_sums, train_one_epoch
from bfly.core.env import DistEnv, dist_env, elastic_error_file, stall_hooks
from bfly.core.errors import Failure, one_line, one_line_warnings, recorded, release_frames
from bfly.core.stack import Run, build_run, evaluated_model, pick_device, seed_all
from bfly.core.stopping import (
    EXIT_HANG,
    OTHER_RANK,
    STOP_SIGNALS,
    JobBudget,
    Outcome,
    StopRequest,
    stop_when_parent_dies,
)
from bfly.job import attempts, retry
from bfly.job.watchdog import Heartbeat, Limits, Watchdog, configure_nccl, watched
from bfly.run.health import RankHealth, slowed_for_test
from bfly.run.profile import StepProfiler
from bfly.run.resume import RunCheckpoints, load_start_state, record_changes, space_needed, write_config
from bfly.run.rundir import RunDirBusy, StartupRefused, lock_run_dir
from bfly.run.runlog import RunLog, epoch_line, epoch_record, open_wandb, step_record

USER_ERRORS = (ConfigError, DataError, ckpt.CheckpointError, RunDirBusy)
EXIT_CRASH = 1  # a bug, a failed collective
EXIT_USER_ERROR = 2  # config, data, run directory, checkpoint: one line names the culprit

# An image that cannot be read or decoded, met while training: --check decodes every image beforehand.
CHECK_HINT = "; run `python -m bfly.train --check` to find every such file before a long run"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bfly.train",
        description=__doc__.split("\n")[0],
        epilog=help_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML config file (see configs/)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument(
        "--check",
        action="store_true",
        help="preflight: validate config and data (decode every image), print the plan, "
        "exit 0 or 2; writes nothing (bfly/job/preflight.py)",
    )
    parser.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="with --check: the real run's world size (default: this launch's, or WORLD_SIZE)",
    )
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    args = parser.parse_intermixed_args(argv)  # overrides before or after --config
    if args.nproc is not None and not args.check:
        parser.error("--nproc goes with --check (training takes its world size from torchrun or SLURM)")
    return args


def epoch_hooks(
    run: Run,
    checkpoints: RunCheckpoints,
    budget: JobBudget,
    beat: Heartbeat,
    health: RankHealth | None,
    profiler: StepProfiler | None = None,
) -> StepHooks:
    cfg, steps = run.cfg, run.train_input.steps_per_epoch
    total = steps * cfg.train.epochs

    def on_log(st: TrainState, rates: dict[str, float]) -> None:
        count = st.sums["count"].clamp(min=1)
        mem = torch.cuda.max_memory_allocated(run.device) / 2**30 if run.device.type == "cuda" else None
        record, fields = step_record(
            (st.sums["loss"] / count).item(),
            (st.sums["correct"] / count).item(),
            rates,
            run.env.world_size,
            st.epoch,
            mem,
        )
        if health is not None:
            health.window(rates)
            record.update(health.step_record())
            fields.update(health.progress_fields())
        run.log.step(record, st.global_step)
        eta = (total - st.global_step) * run.plan.batch_size / max(record["img_per_s"], 1e-9)
        run.log.progress(st.epoch, cfg.train.epochs, st.step_in_epoch, steps, eta, fields)

    def on_step(st: TrainState) -> None:
        beat.step_done(st.global_step)
        every = cfg.train.checkpoint_every_steps
        if every and st.global_step % every == 0 and st.step_in_epoch < steps:
            with _saving(run, beat):
                checkpoints.save(st)
        if profiler is not None:  # train.profile_steps
            profiler.at_step(st.global_step)

    def should_stop(st: TrainState, at_log: bool) -> bool:
        if budget.steps_done(st.global_step):
            return True  # the same step on every rank: no need to agree
        # Under DDP every rank must stop at the same step: agree at log points (a host sync), where the
        # ranks' health figures travel too.
        if health is not None:
            if at_log:
                beat.enter("collective")
            return at_log and _exchange(run, health)
        return run.stop.requested

    return StepHooks(cfg.train.log_every, on_log, should_stop, on_step, health.after_backward if health else None)


def _exchange(run: Run, health: RankHealth) -> bool:
    named = health.straggler
    stop = health.exchange(run.stop.requested)
    if line := health.warning(named):
        run.log.warn(line)
    return stop


def _saving(run: Run, beat: Heartbeat):
    """The heartbeat while a checkpoint is saved: rank 0 writes it (the longer limit of a checkpoint write),
    the other ranks only take part in its collectives."""
    return beat.during("checkpoint" if run.env.is_main else "collective")


def finish_epoch(
    run: Run,
    checkpoints: RunCheckpoints,
    state: TrainState,
    epoch_s: float,
    images_before: int,
    beat: Heartbeat,
    health: RankHealth | None = None,
) -> tuple[bool, dict[str, Any]]:
    """images_before: images of this epoch counted before this job (restored from a checkpoint).
    Returns whether last.pt was written (train.checkpoint_every_epochs) and split -> metrics."""
    sums = {k: distributed.all_reduce_sum(v.clone()) for k, v in state.sums.items()}
    t = run.trainer
    lr = t.optimizer.param_groups[0]["lr"]
    record = epoch_record(state.epoch, state.global_step, sums, lr, epoch_s, images_before)
    metrics = {
        split: evaluate(
            evaluated_model(t),
            watched(eval_input.batches(), beat, "eval", "eval"),
            run.meta.num_classes,
            run.device,
            t.amp_dtype,
            t.channels_last,
        )
        for split, eval_input in run.eval_inputs.items()
    }
    for split, m in metrics.items():
        record.update({f"{split}_loss": m["loss"], f"{split}_top1": m["top1"], f"{split}_top5": m["top5"]})
    record["time"] = time.time()
    if health is not None and (ranks := health.epoch_summary()):
        record["health"] = ranks
    key = "valid" if "valid" in metrics else next(iter(metrics), None)
    is_best = key is not None and metrics[key]["top1"] > state.best_top1
    if key is not None and is_best:
        state.best_top1 = metrics[key]["top1"]
    state.epoch += 1
    state.step_in_epoch = 0
    state.sums = new_sums(run.device)
    last_due = (
        state.epoch % run.cfg.train.checkpoint_every_epochs == 0
        or state.epoch >= run.cfg.train.epochs
        or checkpoints.snapshot_due(state)
    )
    with _saving(run, beat):
        if last_due:
            checkpoints.save(state, dict(record) if is_best else None)
        elif is_best:
            checkpoints.save_best(state, dict(record))
    # The stall of the checkpoints of this epoch: step checkpoints so far, plus the epoch's own.
    record["ckpt_stall_s"] = checkpoints.take_stall()
    run.log.epoch(record, state.global_step)
    run.log.info(epoch_line(record, run.cfg.train.epochs))
    return last_due, metrics


def _stopped(run: Run, checkpoints: RunCheckpoints, state: TrainState, budget: JobBudget) -> Outcome:
    """Every rank: the checkpoint of `state` is written (waited for); one line per rank says so."""
    checkpoints.writer.wait()
    why = budget.stop_reason(run.stop.signal_name, state.global_step, state.epoch)
    last = run.run_dir / ckpt.LAST
    where = (
        f"epoch {state.epoch + 1} step {state.step_in_epoch}"
        if state.step_in_epoch
        else f"the end of epoch {state.epoch}"
    )
    if run.env.is_main:
        run.log.info(
            f"stopped by {why}: checkpoint at {where} written to {last}; run again (run.resume=auto) to continue"
        )
    else:
        print(f"[rank {run.env.rank}] stopped by {why}: checkpoint at {where} written to {last} by rank 0", flush=True)
    return Outcome(why, last, tuple(run.stop.caught))


def train_loop(
    run: Run, checkpoints: RunCheckpoints, state: TrainState, beat: Heartbeat
) -> tuple[Outcome, dict[str, Any]]:
    """Trains from `state` to the end of the schedule or a stop; returns how it ended and the latest
    evaluation (split -> metrics). `beat` follows the loop's phases (bfly.watchdog)."""
    cfg = run.cfg
    last_eval: dict[str, Any] = {}
    budget = JobBudget(state.global_step, state.epoch, cfg.run.stop_after_steps, cfg.run.stop_after_epochs)
    health = RankHealth.start(run.trainer.model, run.env, run.device)
    profiler = StepProfiler.for_run(cfg.train.profile_steps, run.run_dir, run.device, run.env.is_main, run.log.info)
    hooks = epoch_hooks(run, checkpoints, budget, beat, health, profiler)
    beat.step = state.global_step
    try:
        if profiler is not None:
            profiler.at_step(state.global_step)
        while state.epoch < cfg.train.epochs:
            if state.step_in_epoch == 0:
                seed_all(cfg.train.seed, run.env.rank, state.epoch)
            t0 = device_clock(run.device)
            beat.enter("collective")
            images_before = int(distributed.all_reduce_sum(state.sums["count"].clone()).item())
            batches = slowed_for_test(run.train_input.batches(state.epoch, state.step_in_epoch), run.env.rank)
            if not train_one_epoch(run.trainer, state, watched(batches, beat), hooks):
                with _saving(run, beat):
                    checkpoints.save(state)
                    return _stopped(run, checkpoints, state, budget), last_eval
            saved, last_eval = finish_epoch(
                run, checkpoints, state, device_clock(run.device) - t0, images_before, beat, health
            )
            beat.enter("collective")
            if state.epoch < cfg.train.epochs and (
                budget.epochs_done(state.epoch) or distributed.any_rank(run.stop.requested, run.device)
            ):
                with _saving(run, beat):
                    if not saved:
                        checkpoints.save(state)
                    return _stopped(run, checkpoints, state, budget), last_eval
        with _saving(run, beat):
            checkpoints.writer.wait()
        return Outcome(), last_eval
    finally:
        if profiler is not None:  # a stop inside the window: what was recorded is written
            profiler.close()


def train(cfg: Config, env: DistEnv, stop: StopRequest, watch: Watchdog | None = None) -> Outcome:
    """watch: the process's watchdog (bfly.watchdog), which this run's heartbeat and wandb report to."""
    beat = watch.beat if watch else Heartbeat(env.rank)
    meta = load_metadata(cfg.data.root, splits=sorted({"train", *cfg.train.eval_splits}))
    run_dir = run_dir_of(cfg)
    device = pick_device(env.local_rank, env.local_world_size)
    beat.stall_for_test("startup")
    if device.type == "cuda":
        configure_nccl(run_dir, cfg.dist.timeout_s)
    with beat.during("rendezvous"):
        distributed.init(env, device, cfg.dist.backend, cfg.dist.timeout_s)
    # An unwritable directory fails now, not after an epoch. After the process group is up: the other
    # ranks, in their next collective, learn that rank 0 failed (before it, they would wait for it).
    if env.is_main:
        ckpt.ensure_writable(run_dir)
    lock = lock_run_dir(run_dir, env)
    log = RunLog(run_dir, env.is_main)
    writer = ckpt.CheckpointWriter(cfg.train.checkpoint_async)
    try:
        run = build_run(cfg, env, meta, run_dir, log, device, stop)
        state, changes, wandb_id = load_start_state(run, writer)
        if env.is_main:
            sizes = ckpt.sizes(run.raw_model, cfg.optim.name, cfg.optim.momentum, run.trainer.ema is not None)
            ckpt.ensure_space(run_dir, space_needed(run_dir, cfg, *sizes))
        if distributed.any_rank(stop.requested, device):
            why = stop.signal_name or OTHER_RANK
            log.info(f"stopped by {why} during start-up: nothing trained, nothing written")
            return Outcome(why, None, tuple(stop.caught))
        # Every start-up check passed: from here on the run directory changes.
        log.attach(state.epoch)
        if restarted := retry.restart_line(run_dir):
            log.info(restarted)
        if device.type == "cuda":  # where NCCL's flight recorder writes on a collective's timeout
            (run_dir / "hang").mkdir(exist_ok=True)
        config_written = env.is_main and not (run_dir / "config.yaml").exists() and write_config(run_dir, cfg)
        with attempts.recorded(run_dir, env, device, state, USER_ERRORS) as attempt:  # attempts.jsonl
            if env.is_main and state.epoch < cfg.train.epochs:  # finished: nothing to log
                sink = open_wandb(log, cfg.wandb.mode, lambda: _wandb_sink(run, wandb_id))
                wandb_id = sink.run_id if sink else wandb_id
                if sink and watch:
                    watch.on_hang.append(sink.note_hang)
            if watch:
                watch.before_exit.append(lambda line: attempt.end(attempts.HANG, line, state.global_step))
            record_changes(run, state, changes)
            attempt.outcome = _train_and_report(run, RunCheckpoints(run, writer, wandb_id, config_written), state, beat)
            return attempt.outcome
    except (*USER_ERRORS, RuntimeError) as e:
        if log.attached:  # met after start-up: also in train.log
            log.to_file(f"error{_rank_tag(env)}: {user_message(e)}")
        raise
    finally:
        try:
            writer.wait()
        except Exception as e:
            print(f"bfly.train{_rank_tag(env)}: error: {one_line(e)}", file=sys.stderr, flush=True)
        if lock is not None:
            lock.release()
        log.close()


def _wandb_sink(run: Run, resume_id: str | None):
    from bfly.run.wandb_log import WandbSink, job_info

    job = job_info(run.env.world_size, run.meta, run.device.type, run.run_dir)
    return WandbSink.open(run.cfg, run.run_dir, job, resume_id, run.log.warn)


def _train_and_report(run: Run, checkpoints: RunCheckpoints, state: TrainState, beat: Heartbeat) -> Outcome:
    cfg, env = run.cfg, run.env
    if state.epoch >= cfg.train.epochs:
        run.log.info(
            f"run in {run.run_dir} already finished {cfg.train.epochs} epochs (best valid top1 "
            f"{state.best_top1:.2%}); pick another run.dir, or raise train.epochs with "
            f"run.allow_changes=[train.epochs] to train more"
        )
        return Outcome()
    run.log.info(
        f"bfly: {cfg.model.name}, {run.meta.num_classes} classes, {len(run.meta.splits['train'].paths)} train "
        f"images ({run.meta.layout} layout), {env.world_size} process(es) on {run.device.type}, global batch "
        f"{run.plan.batch_size} = {env.world_size} x {run.plan.accum_steps} x {run.plan.micro_batch}, "
        f"{run.train_input.steps_per_epoch} steps/epoch, run dir {run.run_dir}"
    )
    outcome, last_eval = train_loop(run, checkpoints, state, beat)
    if outcome.finished:
        run.log.info(f"done: best valid top1 {state.best_top1:.2%}; checkpoints in {run.run_dir}")
    for sink in run.log.sinks:
        sink.finish(
            outcome.finished,
            run.stop.signal_name,
            last_eval,
            run.meta,
            cfg.wandb.samples,
            lambda images: _probabilities(run, images),
        )
    return outcome


def _probabilities(run: Run, images: list) -> torch.Tensor:
    from bfly.core.trained import class_probs

    with run.trainer.autocast():
        return class_probs(evaluated_model(run.trainer), images, run.cfg.data.image_size, run.device)


def _rank_tag(env: DistEnv) -> str:
    return f" [rank {env.rank}]" if env.distributed else ""


def user_message(e: BaseException) -> str:
    return one_line(e) + (CHECK_HINT if isinstance(e, ImageError) else "")


@dataclass(frozen=True)
class Result:
    exit_code: int
    outcome: Outcome | None  # None: the job failed or only printed something
    failure: Failure | None = None  # why the exit status is not 0, for torchrun's summary


def run_job(argv: list[str] | None = None) -> Result:
    """The command: parse, train, map the outcome and the errors to an exit status (module docstring)."""
    args = parse_args(argv)
    if args.check:
        from bfly.job.preflight import preflight

        return Result(preflight(args.config, args.overrides, args.nproc), None)
    env = dist_env()
    # Before any start-up work, so that a stop signal at any time ends the job cleanly (no traceback).
    stop = StopRequest().install()
    if env.source == "torchrun":
        stop_when_parent_dies()  # the agent's death (kill -9) becomes a SIGTERM: checkpoint and exit
    announced = None
    watch = None
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(dump_yaml(cfg), end="")
            return Result(0, None)
        # From here on a rank that stops making progress, or cannot honour a stop, is found and ended.
        beat = Heartbeat(env.rank, stall_hooks())
        watch = Watchdog.start(beat, env, Limits.of(cfg.run, cfg.dist.timeout_s), run_dir_of(cfg), stop.signal_name)
        outcome = train(cfg, env, stop, watch)
        code = cfg.run.stopped_exit_code if outcome.by_signal else 0
        return Result(code, outcome, Failure(_stopped_line(env, outcome)) if code else None)
    except StartupRefused:
        refused = f"bfly.train{_rank_tag(env)}: stopping: rank 0 refused the start (see its error)"
        return Result(EXIT_USER_ERROR, None, Failure(refused, follows=True))
    except USER_ERRORS as e:
        line = f"bfly.train: error{_rank_tag(env)}: {user_message(e)}"
        release_frames(e)
        # Start-up errors are the same on every rank: rank 0 reports them. Errors met while training
        # (a bad image) are reported by the rank that met them.
        if env.is_main or distributed.active():
            print(line, file=sys.stderr, flush=True)
        # Now, not at exit: torchrun may end this process while it waits below for the others to read who failed.
        retry.record_exit(EXIT_USER_ERROR)
        # Before the process group closes: the other ranks' next collective fails, and they read who failed.
        announced = distributed.announce_failure(env)
        return Result(EXIT_USER_ERROR, None, Failure(line))
    except RuntimeError as e:
        if watch is not None and watch.settle():  # a hang was declared: the watchdog ends this process
            return Result(EXIT_HANG, None)
        if not distributed.active():
            raise
        # A collective failed: almost always another rank failed first and printed its own error.
        culprit = distributed.failed_rank(env.rank)
        if culprit is not None and culprit != env.rank:
            line = f"bfly.train{_rank_tag(env)}: stopping: rank {culprit} failed (see its error)"
        else:
            line = (
                f"bfly.train{_rank_tag(env)}: stopping, a collective failed ({one_line(e)[:200]}); "
                "the failing rank's error is printed above"
            )
        print(line, file=sys.stderr, flush=True)
        return Result(EXIT_CRASH, None, Failure(line, follows=culprit is not None))
    except Exception:
        announced = distributed.announce_failure(env)  # a bug: the other ranks name this one
        raise
    finally:
        distributed.shutdown()
        if announced:
            announced.wait_read()
        if watch is not None:
            watch.close()
        stop.uninstall()


def _stopped_line(env: DistEnv, outcome: Outcome) -> str:
    written = f"checkpoint written to {outcome.checkpoint}" if outcome.checkpoint else "nothing written"
    return f"bfly.train{_rank_tag(env)}: stopped by {outcome.stopped_by}: {written}; run again to continue"


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
    retry.record_exit(code)  # for the launcher's retry decision (bfly.retry)
    # The outcome is decided and written: a signal that arrives while the process exits (torchrun's
    # SIGTERM to the other trainers once one has exited, say) must not turn it into a death by signal.
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    return code


if __name__ == "__main__":
    sys.exit(_command())
