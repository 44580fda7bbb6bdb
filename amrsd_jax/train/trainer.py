"""The training loop: the state at the edges around the pure credit/loss core.

One iteration (:meth:`Trainer.train_step`) is a sequence of phases
(:mod:`amrsd_jax.train.phases`), each returning a typed record::

    prompts -> Rollouts -> the method's TeacherInputs -> UpdateBatch -> UpdateResult
            -> StepRecord (metrics) -> (eval, checkpoint)

The loop calls the hooks of the method object it holds and never branches on its name.
The policy's parameters live in one place: the sampler and the scorer read the arrays the
update step produces. Randomness is ``fold_in(run_key, step)``, so a run resumed from step
``k`` draws exactly the rollouts an uninterrupted run would.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from etils import epath
from flax import nnx
from tqdm.auto import tqdm

from ..distributed import check_agreement, maybe_initialize_distributed
from ..evaluation import EvalSettings, evaluate
from ..methods.base import MethodContext
from ..models import load_model
from ..programs import build_programs, use_compilation_cache
from ..rollout.sampler import resolve_pad_id, resolve_stop_ids
from ..sharding import make_mesh, shard_model
from ..update import make_optimizer
from .checkpoint import NoIntactCheckpoint, RunCheckpointer, abstract_like
from .config import TrainConfig, check_mesh, config_changes
from .data import prepare_split, prompt_stream
from .metrics import CompileCounter, MetricsLogger, PhaseTimer
from .loop import RunInterrupted, StepLoop, TrainingStopped  # noqa: F401 - part of the API
from .phases import (Counters, StepRecord, bucket_rows, drop_groups, rollout_phase, row_quantum,
                     score_phase, update_phase)


class Trainer:
    """Owns the model, optimizer state, data stream, logs and checkpoints of one run.

    ``model``/``tokenizer``/``train_examples``/``eval_examples`` may be given (tests,
    notebooks); otherwise they come from ``config``.
    """

    def __init__(self, config: TrainConfig, *, model=None, tokenizer=None,
                 train_examples=None, eval_examples=None, resume: bool = False,
                 evaluate_only: bool = False, log=None):
        maybe_initialize_distributed()  # a pod's processes join one job before any device use
        self.config = cfg = config
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.is_main = jax.process_index() == 0
        self.mesh = make_mesh(*check_mesh(cfg, jax.device_count()))
        check_agreement("the run config", cfg.to_dict())  # before any shape is derived from it
        if cfg.compile_cache_dir:  # before the first program is compiled
            use_compilation_cache(cfg.compile_cache_dir)
        self.output_dir = epath.Path(cfg.output_dir)  # a gs:// URL stays one
        self.model, self.tokenizer = self._load(model, tokenizer)
        self.train_data = prepare_split(self.tokenizer, cfg, "train", train_examples, self.log)
        self.eval_data = prepare_split(self.tokenizer, cfg, "eval", eval_examples, self.log)
        self.stream = prompt_stream(self.train_data, cfg)
        self.method = cfg.make_method()
        self.programs = build_programs(
            self.model, self.mesh, step=cfg.step_config(self.method),
            optimizer=make_optimizer(cfg.optimizer), batch=cfg.abstract_batch(method=self.method),
            pad_id=resolve_pad_id(self.tokenizer),
            stop_ids=resolve_stop_ids(self.tokenizer, self.model.config),
            reshard_weights=cfg.rollout.reshard_weights)
        params = nnx.state(self.model, nnx.Param)
        # weight copies made before the first step donates the live ones
        self.teacher_params = self.method.init_teacher(params)
        self.ref_params = jax.tree.map(jnp.copy, params) if cfg.policy.kl_beta > 0 else None
        self.state = self.programs.init_state()
        self.run_key = jax.random.key(cfg.seed)
        # static shapes: every row subset is padded to the step's rows (one program shape)
        self._row_quantum = (cfg.rollout.batch_size if cfg.static_shapes
                             else row_quantum(cfg.rollout.group_size, self.mesh))
        self.counters = Counters(skipped_long_prompts=self.train_data.skipped_long,
                                 truncated_long_prompts=self.train_data.truncated_long,
                                 method=dict.fromkeys(self.method.counters, 0))
        self.checkpointer = None
        if not evaluate_only and (cfg.checkpoint.every or cfg.checkpoint.save_at_end or resume):
            self.checkpointer = RunCheckpointer(self.output_dir / "checkpoints",
                                                max_to_keep=cfg.checkpoint.max_to_keep,
                                                async_save=cfg.checkpoint.async_save)
        if not resume and not evaluate_only:
            self._check_fresh_output_dir()  # a refused run writes nothing into the old one
        # evaluate-only runs log under <output_dir>/eval and never write checkpoints
        # logging.completions_every: a second JSONL next to metrics.jsonl
        self.completions = MetricsLogger(
            self.output_dir, tensorboard=False, filename="completions.jsonl",
            enabled=self.is_main and not evaluate_only and cfg.logging.completions_every > 0)
        self.metrics = MetricsLogger(self.output_dir / "eval" if evaluate_only
                                     else self.output_dir, tensorboard=cfg.tensorboard,
                                     enabled=self.is_main)
        # every evaluation's per-question outcomes, so two runs evaluated on the same
        # questions can be compared question by question (bench compare's paired differences)
        self.eval_outcomes = MetricsLogger(
            self.metrics.path.parent, tensorboard=False, filename="eval_outcomes.jsonl",
            enabled=self.is_main)
        self.start_step = 0
        self.stop_signal: int | None = None  # SIGINT / SIGTERM received during run()
        if resume:
            self._resume()
        elif not evaluate_only:
            self._move_old_metrics_aside("an earlier run's metrics")
        if self.is_main and not evaluate_only:
            (self.output_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    # ------------------------------------------------------------------ set-up
    def _load(self, model, tokenizer):
        if model is not None:
            return shard_model(model, self.mesh), tokenizer
        cfg, t0 = self.config.model, time.perf_counter()
        model, tokenizer = load_model(cfg.name, cfg.dtype, param_dtype=cfg.param_dtype,
                                      remat_policy=cfg.remat_policy,
                                      scan_layers=cfg.scan_layers, mesh=self.mesh)
        self.log(f"loaded {cfg.name} ({model.config.num_params() / 1e6:.0f}M params) in "
                 f"{time.perf_counter() - t0:.1f}s")
        return model, tokenizer

    # ------------------------------------------------------------------ one iteration
    def train_step(self, step: int) -> StepRecord:
        """Run iteration ``step`` (0-based): its metrics and the update step's inputs."""
        cfg, timer, compiles = self.config, PhaseTimer(), CompileCounter()
        k_roll, k_teacher, k_score = jax.random.split(jax.random.fold_in(self.run_key, step), 3)
        params = self.state.params
        first = step == self.start_step  # this process's first step compiles its programs
        if first:
            self.log("first step: compiling the sampler and scoring programs ...")
        with timer("generate"):
            rollouts = rollout_phase(cfg, self.programs, self.tokenizer, params,
                                     self.train_data, self.stream.next_batch(), k_roll,
                                     self.method.uses_rollout_cache(cfg))
            dropped = drop_groups(cfg, rollouts)
        host = {"accuracy": float(rollouts.verified.correct.mean()),
                "reward_errors": rollouts.verified.errors}
        self.counters.add({"reward_errors": rollouts.verified.errors, "dropped_groups": dropped})
        ctx = MethodContext(cfg, self.tokenizer, self.programs, params, self.teacher_params,
                            int(self.state.step), k_teacher, k_score,
                            functools.partial(bucket_rows, quantum=self._row_quantum,
                                              limit=rollouts.num_rows),
                            static_shapes=cfg.static_shapes)
        with timer("reflect"):
            teacher = self.method.teacher_inputs(ctx, rollouts)
            if teacher is not None:
                host.update(teacher.metrics)
                self.counters.add(teacher.counts)
        rollouts.kv_state = None  # the rollout cache is not needed past the teacher inputs
        with timer("score"):
            batch, score_metrics = score_phase(self.method, ctx, rollouts, teacher,
                                               self.ref_params)
        with timer("update"):
            if first:
                self.log("compiling the update step (first step only) ...")
            result = update_phase(self.programs, self.state, self.teacher_params, batch)
        self.state, self.teacher_params = result.state, result.teacher_params
        nnx.update(self.model, self.state.params)
        self.counters.consecutive_skips = self.counters.consecutive_skips + 1 \
            if result.skipped else 0
        self.counters.add({"skipped_steps": int(result.skipped)})
        metrics = {**result.metrics, **host, **score_metrics, **timer.pop(), **compiles.pop()}
        metrics["tokens_per_second"] = float(rollouts.sample.mask.sum()) / max(
            metrics["time/step"], 1e-9)
        metrics["epoch"] = self.stream.epoch
        return StepRecord(step, metrics, rollouts, teacher, batch)

    # ------------------------------------------------------------------ eval / checkpoint
    def evaluate(self, step: int, *, progress: bool = False) -> dict[str, float] | None:
        """Held-out metrics of the current weights (logged as ``kind=eval``); ``progress``
        shows a bar over the questions."""
        if not self.eval_data.examples:
            return None
        cfg, e = self.config, self.config.eval
        settings = EvalSettings(num_samples=e.num_samples, temperature=e.temperature,
                                max_new_tokens=e.max_new_tokens, batch_size=e.batch_size,
                                max_prompt_tokens=cfg.data.max_prompt_tokens,
                                on_long_prompt=cfg.data.on_long_prompt, reward=cfg.reward_name(),
                                success_threshold=cfg.reward.success_threshold,
                                system_prompt=cfg.model.system_prompt)
        nnx.update(self.model, self.state.params)
        t0 = time.perf_counter()
        key = jax.random.fold_in(jax.random.fold_in(self.run_key, 1_000_003), step)
        report = evaluate(self.model, self.tokenizer, self.eval_data.examples, key, settings,
                          render=lambda ex: ex["prompt"], mesh=self.mesh,
                          progress=progress and self.is_main)
        metrics = {**report.metrics, "time/eval": time.perf_counter() - t0}
        self.metrics.log(step, metrics, kind="eval")
        records = report.records  # one line per evaluation: a list per field, in id order
        self.eval_outcomes.log(step, {"id": [r["id"] for r in records], **{
            key: [cast(r[key]) for r in records] for key, cast in (
                ("greedy_correct", bool), ("n_correct", int), ("num_samples", int))
            if records and key in records[0]}}, kind="eval_outcomes")
        return metrics

    def save(self, step: int) -> None:
        """Checkpoint after ``step`` completed iterations."""
        if self.checkpointer is None:
            return
        self.checkpointer.save(step, train_state=self.state, teacher_params=self.teacher_params,
                               rng_key=self.run_key, data_state=self.stream.state_dict(),
                               config=self.config.to_dict(), extra=self.counters.as_dict())

    def _resume(self) -> None:
        restored, damaged = self.checkpointer.restore_intact(**self._restore_targets())
        if damaged:
            newest = damaged[0]
            self.log(f"checkpoint step{'s' if len(damaged) > 1 else ''} "
                     f"{', '.join(str(d.step) for d in damaged)} damaged ({newest.reason}); "
                     + (f"step {restored.step} is intact, resuming from {restored.step}"
                        if restored else "no intact step")
                     + (f"; moved to {newest.moved_to}" if newest.moved_to else ""))
        if restored is None:
            if damaged:
                raise NoIntactCheckpoint(
                    f"--resume: no intact checkpoint in {self.output_dir / 'checkpoints'} "
                    "(damaged steps were moved aside); start a new run with another "
                    "output_dir, or drop --resume after moving this one away")
            self.log(f"--resume: no checkpoint in {self.output_dir / 'checkpoints'}; "
                     "starting from step 0")
            self._move_old_metrics_aside("the metrics of the run killed before its first "
                                         "checkpoint")
            return
        self._use_restored(restored)
        changed = config_changes(restored.config, self.config.to_dict())
        if changed:
            self.log("warning: resuming with settings changed since the checkpoint: "
                     + "; ".join(changed))
        self.run_key = restored.rng_key
        self.stream.load_state_dict(restored.data_state)
        self.counters.load(restored.extra)
        self.start_step = restored.step
        dropped, whole = self.metrics.truncate_after(restored.step)
        self.completions.truncate_after(restored.step)  # kept whole first, like the metrics
        self.eval_outcomes.truncate_after(restored.step)
        self.log(f"resumed from step {restored.step}"
                 + (f" ({dropped} log lines after it dropped; the file as it was is kept as "
                    f"{whole})" if dropped else ""))

    def _check_fresh_output_dir(self) -> None:
        """A new run never mixes with an old one: checkpoints there are an error (resume or
        pick another output_dir), raised before anything is written."""
        if self.checkpointer is not None and self.checkpointer.all_steps():
            raise FileExistsError(
                f"{self.output_dir} already holds checkpoints {self.checkpointer.all_steps()} "
                "of another run; pass --resume to continue it, or set output_dir=... for a "
                "new run")

    def _move_old_metrics_aside(self, what: str) -> None:
        kept = self.metrics.move_aside()  # never deleted
        self.completions.move_aside()
        self.eval_outcomes.move_aside()
        if kept is not None:
            self.log(f"{what} were moved to {kept}")

    def log_completions(self, step: int, rows: list[dict]) -> None:
        """Write one step's rollouts (``StepRecord.completions``) to ``completions.jsonl``
        and, as a Markdown table, to TensorBoard text."""
        for row in rows:
            self.completions.log(step, row, kind="completion")

        def cell(text) -> str:
            return " ".join(str(text).split()).replace("|", "\\|")[:300]

        table = ["| group | reward | prompt | completion | feedback |", "|---|---|---|---|---|"]
        table += [f"| {r['group']} | {r['reward']:.2f} | {cell(r['prompt'])} | "
                  f"{cell(r['completion'])} | {cell(r['feedback'])} |" for r in rows]
        self.metrics.log_text(step, "completions", "\n".join(table))

    def _restore_targets(self) -> dict[str, Any]:
        """The abstract, sharded train state and teacher a checkpoint restores into."""
        sharding = self.programs.state_sharding
        abstract_teacher = None if self.teacher_params is None else \
            abstract_like(self.teacher_params, sharding.params)
        return {"abstract_train_state": abstract_like(self.state, sharding),
                "abstract_teacher_params": abstract_teacher}

    def _use_restored(self, restored) -> None:
        self.state = restored.train_state
        if self.teacher_params is not None:
            self.teacher_params = restored.teacher_params
        nnx.update(self.model, self.state.params)

    def _restore(self, checkpointer, step: int | None):
        """Load train state (and teacher weights) of ``step`` into this trainer."""
        restored = checkpointer.restore(step, **self._restore_targets())
        self._use_restored(restored)
        return restored

    def restore_weights(self, run_dir: str | os.PathLike) -> int:
        """Evaluate-only: load the latest checkpoint of another run directory (or its
        ``checkpoints`` folder); returns its step."""
        path = Path(run_dir)
        if (path / "checkpoints").is_dir():
            path = path / "checkpoints"
        restored = self._restore(RunCheckpointer(path, async_save=False, read_only=True), None)
        self.start_step = restored.step
        return restored.step

    # ------------------------------------------------------------------ the loop
    def _on_stop_signal(self, signum, frame):
        name = signal.Signals(signum).name
        if self.stop_signal is not None:  # asked twice: the user does not want to wait
            self.log(f"{name} again: exiting now; the last committed checkpoint is intact")
            # raised, not os._exit: a notebook kernel survives a second interrupt
            raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)
        self.stop_signal = signum
        self.log(f"{name}: finishing this step, writing a checkpoint, then exiting "
                 "(send it again to exit at once)")

    def run(self) -> dict[str, Any]:
        """Train from ``start_step`` to ``config.steps``; returns a summary. SIGINT (Ctrl-C)
        and SIGTERM finish the step, save and raise :class:`RunInterrupted`."""
        cfg = self.config
        on_main_thread = threading.current_thread() is threading.main_thread()
        previous = {sig: signal.signal(sig, self._on_stop_signal)
                    for sig in (signal.SIGINT, signal.SIGTERM)} if on_main_thread else {}
        bar = tqdm(total=cfg.steps, initial=self.start_step, desc=f"train {cfg.method}",
                   unit="step", dynamic_ncols=True) if cfg.progress and self.is_main else None
        loop = StepLoop(self, bar)
        try:
            loop.run()
        finally:
            if bar is not None:
                bar.close()
            if self.checkpointer is not None:
                self.checkpointer.wait_until_finished()
            self.metrics.flush()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return {"history": loop.history, "eval": loop.last_eval, "eval_step": loop.eval_step,
                "output_dir": os.fspath(self.output_dir),
                "metrics_path": os.fspath(self.metrics.path),
                "checkpoint_dir": os.fspath(self.output_dir / "checkpoints")}

    def close(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.close()
        self.metrics.close()
        self.completions.close()
        self.eval_outcomes.close()


def train(config: TrainConfig, *, resume: bool = False, **kwargs) -> dict[str, Any]:
    """Build a :class:`Trainer`, run it, close it; returns :meth:`Trainer.run`'s summary."""
    trainer = Trainer(config, resume=resume, **kwargs)
    try:
        return trainer.run()
    finally:
        trainer.close()
