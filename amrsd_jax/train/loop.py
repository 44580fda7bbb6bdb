"""The step loop of a run: train, log, evaluate and checkpoint on schedule; stop on
SIGTERM (after a checkpoint) or after too many consecutive non-finite steps."""

from __future__ import annotations

import dataclasses
from typing import Any


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (too many non-finite steps); the last good checkpoint is
    intact."""


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
        self.last_eval, self.eval_step = self.trainer.evaluate(step), step

    def run(self) -> None:
        t, cfg = self.trainer, self.trainer.config
        if cfg.eval.at_start and t.start_step == 0:
            self.evaluate(0)
        step = t.start_step
        while step < cfg.steps:
            self.log(t.train_step(step).metrics, step + 1)
            step += 1
            if t.counters.consecutive_skips >= cfg.max_consecutive_skips:
                raise TrainingStopped(
                    f"{t.counters.consecutive_skips} consecutive steps had non-finite loss or "
                    f"gradients (step {step}); stopping. The last good checkpoint in "
                    f"{t.output_dir / 'checkpoints'} is intact; lower the learning rate or "
                    "check the rewards, then --resume")
            if cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.steps:
                self.evaluate(step)
            scheduled = bool(cfg.checkpoint.every and step % cfg.checkpoint.every == 0)
            if scheduled or t._stop_requested:
                t.save(step)
            if t._stop_requested:
                t.log(f"stopped after step {step} on SIGTERM; checkpoint saved")
                return
        if cfg.eval.at_end:
            self.evaluate(step)
        if cfg.checkpoint.save_at_end and not (cfg.checkpoint.every
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
