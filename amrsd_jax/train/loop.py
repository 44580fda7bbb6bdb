"""The step loop of a run: train, log, evaluate and checkpoint on schedule; stop on
SIGINT / SIGTERM (after a checkpoint) or after too many consecutive non-finite steps."""

from __future__ import annotations

import dataclasses
import signal
from typing import Any

import jax


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (too many non-finite steps); the last good checkpoint is
    intact."""


class RunInterrupted(Exception):
    """SIGINT / SIGTERM stopped the run after ``step`` steps, and a checkpoint of that step
    was written: ``--resume`` continues it. ``exit_code`` is the shell's 128 + signal."""

    def __init__(self, step: int, signum: int):
        self.step, self.signum = step, signum
        self.signal_name = signal.Signals(signum).name
        self.exit_code = 128 + signum
        super().__init__(f"stopped at step {step} on {self.signal_name}")


class ProfileWindow:
    """A ``jax.profiler`` trace of steps ``first..last`` (1-based, inclusive) into
    ``directory`` (TensorBoard's profile plugin, XProf and Perfetto read it); only on the
    process given ``enabled``. ``steps=None`` does nothing."""

    def __init__(self, steps: tuple[int, int] | None, directory, *, enabled: bool, log):
        self.first, self.last = steps if steps and enabled else (None, None)
        self.directory, self.log, self.active = directory, log, False

    def before(self, step: int) -> None:
        if step == self.first:
            jax.profiler.start_trace(str(self.directory))
            self.active = True

    def after(self, step: int) -> None:
        if step == self.last:
            self.stop()

    def stop(self) -> None:
        if self.active:
            jax.effects_barrier()  # the traced steps' device work ends inside the trace
            jax.profiler.stop_trace()
            self.active = False
            self.log(f"profiler trace of steps {self.first}-{self.last} written to "
                     f"{self.directory} (tensorboard --logdir {self.directory})")


@dataclasses.dataclass
class StepLoop:
    """The step loop of :meth:`Trainer.run`: train, log, evaluate and checkpoint on
    schedule, stop on SIGTERM or too many non-finite steps."""

    trainer: Any  # the Trainer
    bar: Any
    history: list = dataclasses.field(default_factory=list)
    last_eval: dict | None = None
    eval_step: int | None = None

    def evaluate(self, step: int) -> None:
        # a bar over the held-out questions whenever the run shows one over its steps
        self.last_eval = self.trainer.evaluate(step, progress=self.bar is not None)
        self.eval_step = step

    def run(self) -> None:
        """The final eval comes before the final checkpoint, so a run whose checkpoint is at
        ``steps`` is finished: resuming it does nothing (no second eval line)."""
        t, cfg = self.trainer, self.trainer.config
        if t.start_step >= cfg.steps:
            t.log(f"the run already finished {t.start_step} steps; nothing to do (raise "
                  "steps= to train further)")
            return
        if cfg.eval.at_start and t.start_step == 0:
            self.evaluate(0)
        step = t.start_step
        profiler = ProfileWindow(cfg.logging.profile_steps, t.output_dir / "profile",
                                 enabled=t.is_main, log=t.log)
        try:
            self._steps(step, profiler)
        finally:
            profiler.stop()  # an exception or a signal must not leave a trace half-written

    def _steps(self, step: int, profiler: "ProfileWindow") -> None:
        t, cfg = self.trainer, self.trainer.config
        while step < cfg.steps:
            if t.stop_signal is not None:  # arrived during the first eval: nothing new to save
                raise RunInterrupted(step, t.stop_signal)
            profiler.before(step + 1)
            record = t.train_step(step)
            profiler.after(step + 1)
            self.log(record.metrics, step + 1)
            step += 1
            every = cfg.logging.completions_every
            if every and step % every == 0:
                t.log_completions(step, record.completions())
            if t.counters.consecutive_skips >= cfg.max_consecutive_skips:
                raise TrainingStopped(
                    f"{t.counters.consecutive_skips} consecutive steps had non-finite loss or "
                    f"gradients (step {step}); stopping. The last good checkpoint in "
                    f"{t.output_dir / 'checkpoints'} is intact; lower the learning rate or "
                    "check the rewards, then --resume")
            if step == cfg.steps:  # a signal now just lets the run finish
                break
            if cfg.eval.every and step % cfg.eval.every == 0:
                self.evaluate(step)
            if t.stop_signal is not None or (cfg.checkpoint.every
                                             and step % cfg.checkpoint.every == 0):
                t.save(step)
            if t.stop_signal is not None:
                raise RunInterrupted(step, t.stop_signal)
        if cfg.eval.at_end:
            self.evaluate(step)
        if cfg.checkpoint.save_at_end or (cfg.checkpoint.every
                                          and step % cfg.checkpoint.every == 0):
            t.save(step)

    def log(self, metrics: dict, step: int) -> None:
        # run totals next to the step's own counts (redactions, reward_errors ...)
        metrics.update({f"total/{k}": v for k, v in self.trainer.counters.as_dict().items()})
        self.history.append(self.trainer.metrics.log(step, metrics))
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}",
                                 acc=f"{metrics['accuracy']:.2f}",
                                 len=f"{metrics['response_length_mean']:.0f}",
                                 s=f"{metrics['time/step']:.1f}")
