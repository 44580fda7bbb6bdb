"""The training loop: the state at the edges around the pure credit/loss core.

One iteration (``Trainer.train_step``):

    prompts -> G rollouts (jitted sampler) -> verify -> [reflections -> leak guard]
    -> teacher contexts -> scoring passes (old / teacher / reference / entropy / OAR)
    -> the one jitted update step -> metrics -> (eval, checkpoint)

The policy's parameters live in one place: the sampler and the scorer read the same
arrays the update step produces (``nnx.update`` after each step, no weight copy).
Randomness is ``fold_in(run_key, step)``, so a run resumed from step ``k`` draws exactly
the rollouts an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..credit.registry import get_method
from ..data import PromptStream
from ..reflection.contexts import amr_sd_teacher_prompt, raw_peer_teacher_prompt
from ..rollout.prompts import encode_chat, encode_follow_up
from ..rollout.sampler import SamplingConfig, continue_generation, generate
from ..scoring import make_scorer, outcome_importance
from ..sharding import make_mesh
from ..update import (StepConfig, ema_update, init_train_state, make_optimizer,
                      make_update_step)
from . import rollouts
from .config import TrainConfig, check_mesh, update_batch_keys
from .data import PreparedData, encode_teacher_prompts, left_padded, load_examples, prepare
from .metrics import MetricsLogger, PhaseTimer


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (too many non-finite steps); the last good checkpoint is
    intact."""


def maybe_initialize_distributed() -> bool:
    """``jax.distributed.initialize()`` when the environment describes a multi-process job
    (a coordinator address, or a multi-worker Cloud TPU slice). Returns whether it ran.

    On clusters JAX detects by itself (Cloud TPU, SLURM, Open MPI, Kubernetes) nothing else
    is needed; elsewhere set ``JAX_COORDINATOR_ADDRESS=host:port``, ``JAX_NUM_PROCESSES``
    and ``JAX_PROCESS_ID`` on every process."""
    env = os.environ
    multi_tpu = "," in env.get("TPU_WORKER_HOSTNAMES", "")
    if env.get("JAX_COORDINATOR_ADDRESS") or multi_tpu:
        if not jax.distributed.is_initialized():
            explicit = {}
            if env.get("JAX_NUM_PROCESSES") and env.get("JAX_PROCESS_ID"):
                explicit = dict(coordinator_address=env.get("JAX_COORDINATOR_ADDRESS"),
                                num_processes=int(env["JAX_NUM_PROCESSES"]),
                                process_id=int(env["JAX_PROCESS_ID"]))
            jax.distributed.initialize(**explicit)
        return True
    return False


def _copy(tree):
    return jax.tree.map(jnp.copy, tree)


def _to_host(x) -> np.ndarray:
    """A (possibly multi-host sharded) array as a full numpy array on this host."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


class Trainer:
    """Owns the model, optimizer state, data stream, logs and checkpoints of one run.

    ``model``/``tokenizer``/``train_examples``/``eval_examples`` may be given (tests,
    notebooks); otherwise they come from ``config``.
    """

    def __init__(self, config: TrainConfig, *, model=None, tokenizer=None,
                 train_examples=None, eval_examples=None, resume: bool = False,
                 evaluate_only: bool = False, log=None):
        self.config = cfg = config
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.method = get_method(cfg.method)
        self.is_main = jax.process_index() == 0
        self.mesh = make_mesh(*check_mesh(cfg, jax.device_count()))
        self.output_dir = Path(cfg.output_dir)

        if model is None:
            from ..models import load_model

            t0 = time.perf_counter()
            model, tokenizer = load_model(cfg.model.name, cfg.model.dtype,
                                          param_dtype=cfg.model.param_dtype,
                                          remat=cfg.model.remat, mesh=self.mesh)
            self.log(f"loaded {cfg.model.name} ({model.config.num_params() / 1e6:.0f}M params) "
                     f"in {time.perf_counter() - t0:.1f}s")
        else:
            from ..sharding import shard_model

            model = shard_model(model, self.mesh)
        self.model, self.tokenizer = model, tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.stop_ids = sorted({*model.config.eos_token_ids,
                                *([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None
                                  else [])})

        self.train_data = self._prepare("train", train_examples)
        self.eval_data = self._prepare("eval", eval_examples)
        if not self.train_data.examples:
            raise ValueError("no training examples left after loading and the prompt budget "
                             f"(skipped {self.train_data.skipped_long} long prompts)")
        per_host, rem = divmod(cfg.rollout.prompts_per_step, jax.process_count())
        if rem:
            raise ValueError(f"rollout.prompts_per_step={cfg.rollout.prompts_per_step} is not "
                             f"divisible by the {jax.process_count()} processes")
        self.stream = PromptStream(list(range(len(self.train_data.examples))), per_host,
                                   seed=cfg.seed, shard_index=jax.process_index(),
                                   shard_count=jax.process_count())

        self.optimizer = make_optimizer(cfg.optimizer)
        self.step_config = StepConfig(
            method=cfg.method, group_size=cfg.rollout.group_size,
            advantage_scale=cfg.advantage_scale, micro_batches=cfg.micro_batches,
            policy=cfg.policy, method_config=cfg.method_settings(), vocab_chunk=cfg.vocab_chunk)
        self.graphdef, params, self.other = nnx.split(model, nnx.Param, ...)
        # shardings depend only on each batch key's rank, so a placeholder batch declares them
        self._step_fn, self.state_sharding = make_update_step(
            model, self.optimizer, self.step_config, self.mesh, self._placeholder_batch())
        self.state = jax.device_put(init_train_state(model, self.optimizer), self.state_sharding)
        # teacher and reference weights (SPEC.md): live = the policy's own arrays
        weights = self.method.teacher_weights
        self.teacher_params = _copy(params) if weights in ("ema", "frozen") else None
        self.ref_params = _copy(params) if cfg.policy.kl_beta > 0 else None
        self.scorer = make_scorer(model, self.mesh, vocab_chunk=cfg.vocab_chunk,
                                  with_entropy="entropy" in self.method.passes)
        self._ema = jax.jit(lambda t, p: ema_update(t, p, cfg.ema_rate), donate_argnums=(0,))
        self.run_key = jax.random.key(cfg.seed)
        # row-subset batches (AMR-SD reflections) come in multiples of this
        self._row_quantum = math.lcm(cfg.rollout.group_size,
                                     self.mesh.shape["data"] * self.mesh.shape["fsdp"])
        self.counters = {"skipped_long_prompts": self.train_data.skipped_long,
                         "truncated_long_prompts": self.train_data.truncated_long,
                         "reward_errors": 0, "redactions": 0, "consecutive_skips": 0,
                         "skipped_steps": 0}
        # evaluate-only runs log under <output_dir>/eval and never write checkpoints
        self.metrics = MetricsLogger(self.output_dir / "eval" if evaluate_only
                                     else self.output_dir, tensorboard=cfg.tensorboard,
                                     enabled=self.is_main)
        self.checkpointer = None
        if not evaluate_only and (cfg.checkpoint.every or cfg.checkpoint.save_at_end or resume):
            from .checkpoint import RunCheckpointer

            self.checkpointer = RunCheckpointer(self.output_dir / "checkpoints",
                                                max_to_keep=cfg.checkpoint.max_to_keep,
                                                async_save=cfg.checkpoint.async_save)
        self.start_step = 0
        self._stop_requested = False
        if self.is_main and not evaluate_only:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        if resume:
            self._resume()
        elif not evaluate_only:
            self._check_fresh_output_dir()

    # ------------------------------------------------------------------ data
    def _prepare(self, split: str, examples) -> PreparedData:
        skipped_rows, problems = 0, []
        if examples is None:
            examples, skipped_rows, problems = load_examples(self.config.data, split)
            for p in problems[:5]:
                self.log(f"skipped bad {split} row: {p}")
        data = prepare(self.tokenizer, examples, self.config.data,
                       system_prompt=self.config.model.system_prompt)
        if data.skipped_long or data.truncated_long or skipped_rows:
            self.log(f"{split}: {len(data.examples)} prompts; {skipped_rows} bad rows skipped, "
                     f"{data.skipped_long} over {self.config.data.max_prompt_tokens} tokens "
                     f"skipped, {data.truncated_long} truncated")
        return dataclasses.replace(data, skipped_rows=skipped_rows, problems=problems)

    # ------------------------------------------------------------------ compiled pieces
    def _importance(self, batch: dict, answer_mask: np.ndarray, key) -> np.ndarray:
        mode = "gradient" if "outcome_gradient" in self.method.passes else "perturbation"
        if not hasattr(self, "_importance_fn"):
            graphdef, other = self.graphdef, self.other
            oar_cfg = self.step_config.method_config
            pad_id = self.pad_id

            def fn(params, prompt_ids, prompt_mask, response_ids, response_mask, answer, rng):
                model = nnx.merge(graphdef, params, other)
                return outcome_importance(model, prompt_ids, prompt_mask, response_ids,
                                          response_mask, answer, mode=mode,
                                          oar_config=oar_cfg, pad_id=pad_id, rng=rng)

            from ..sharding import batch_sharding

            rows = batch_sharding(self.mesh, 2)  # what the update step expects
            self._importance_fn = jax.jit(fn, out_shardings=rows)
        return self._importance_fn(self.state.params, batch["prompt_ids"], batch["prompt_mask"],
                                   batch["response_ids"], batch["response_mask"],
                                   answer_mask, key)

    # ------------------------------------------------------------------ one iteration
    def _sample(self, ids, mask, key, *, max_new_tokens, temperature, top_p=1.0, top_k=0,
                keep_cache=False):
        """Host-side :class:`SampleOutput`; with ``keep_cache`` also the device-side
        :class:`KVState` to continue these rows (:meth:`_continue`)."""
        nnx.update(self.model, self.state.params)
        out = generate(self.model, ids, mask, key,
                       SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                                      top_p=top_p, top_k=top_k),
                       stop_tokens=self.stop_ids, pad_id=self.pad_id, mesh=self.mesh,
                       return_state=keep_cache)
        if keep_cache:
            return jax.tree.map(_to_host, out[0]), out[1]
        return jax.tree.map(_to_host, out)

    def _continue(self, kv_state, rows, ids, mask, key, *, max_new_tokens, temperature,
                  top_p=1.0):
        out = continue_generation(self.model, kv_state, rows, ids, mask, key,
                                  SamplingConfig(max_new_tokens=max_new_tokens,
                                                 temperature=temperature, top_p=top_p),
                                  stop_tokens=self.stop_ids, pad_id=self.pad_id, mesh=self.mesh)
        return jax.tree.map(_to_host, out)

    def _teacher_tokens(self, messages: list[str | None], fallback_ids, fallback_mask):
        ids, mask, valid, truncated = encode_teacher_prompts(
            self.tokenizer, messages, fallback_ids, fallback_mask,
            max_tokens=self.config.reflection.max_teacher_prompt_tokens,
            system_prompt=self.config.model.system_prompt, pad_id=self.pad_id)
        self.counters["truncated_teacher_prompts"] = \
            self.counters.get("truncated_teacher_prompts", 0) + truncated
        return ids, mask, valid

    def _gate_active(self) -> bool:
        """Whether AMR-SD's gate can be non-zero at the coming optimizer step (not yet
        annealed away, lam or gam > 0)."""
        settings = self.step_config.method_config
        if settings is None or not self.config.reflection.skip_uninformative:
            return True
        if settings.lam == 0 and settings.gam == 0:
            return False
        return settings.decay_steps is None or int(self.state.step) < settings.decay_steps

    def _reflection_teacher(self, questions, texts, verified, rewards, golds, examples, key,
                            host, rollout=None, kv_state=None):
        """AMR-SD's teacher prompts for the rows that need one.

        Returns ``((ids, mask, valid), rows)``: left-padded teacher prompts for ``rows``
        (padded up to a bucket of rows, see :func:`_bucket_rows`) and the row indices they
        belong to. With ``reflection.skip_uninformative`` only rows of groups with unequal
        rewards are reflected on, and none once the gate is annealed to 0. With
        ``reflection.request=follow_up`` the requests continue the rollouts' conversations
        from ``kv_state`` (``rollout`` is the rollouts' :class:`SampleOutput`).
        """
        cfg, G = self.config, self.config.rollout.group_size
        B = len(texts)
        self.last_rollout["reflections"] = [None] * B  # None: not reflected on
        if cfg.reflection.skip_uninformative:
            grouped = np.asarray(rewards, np.float32).reshape(-1, G)
            mixed = np.repeat(grouped.max(1) > grouped.min(1), G)
            rows = np.flatnonzero(mixed) if self._gate_active() else np.zeros(0, np.int64)
        else:
            rows = np.arange(B)
        if cfg.reflection.source == "raw_peer":  # ablation: no reflection, the peer verbatim
            peers = {int(i): rollouts.group_peer(int(i), texts, verified, G) for i in rows}
            rows = np.array([i for i in rows if peers[int(i)] is not None], np.int64)
            messages = [raw_peer_teacher_prompt(questions[i], peers[int(i)])
                        for i in rows]
        else:
            messages = []
            if len(rows):
                padded = _bucket_rows(rows, self._row_quantum, B)
                follow_up = cfg.reflection.request == "follow_up"
                if follow_up and kv_state is None:
                    raise ValueError("reflection.request=follow_up needs the rollouts' KV cache")
                requests = rollouts.reflection_messages(
                    questions, texts, verified, G, use_peer=cfg.reflection.use_peer,
                    reference_solutions=[ex.get("solution") for ex in examples]
                    if cfg.reflection.use_reference_solution else None, follow_up=follow_up)
                sampling = dict(max_new_tokens=cfg.reflection.max_tokens,
                                temperature=cfg.reflection.temperature,
                                top_p=cfg.reflection.top_p)
                if follow_up:  # only the new turn is prefilled, on the rollout's cache
                    last = rollout.tokens[padded, np.maximum(rollout.lengths[padded] - 1, 0)]
                    ended = (rollout.lengths[padded] > 0) & np.isin(last, self.stop_ids)
                    enc = encode_follow_up(self.tokenizer, [requests[i] for i in padded],
                                           ended, self.stop_ids,
                                           max_tokens=cfg.reflection.max_prompt_tokens,
                                           system_prompt=cfg.model.system_prompt)
                    r_out = self._continue(kv_state, padded, enc.ids, enc.mask, key, **sampling)
                else:
                    enc = encode_chat(self.tokenizer, [requests[i] for i in padded],
                                      max_tokens=cfg.reflection.max_prompt_tokens,
                                      system_prompt=cfg.model.system_prompt, on_long="truncate")
                    r_out = self._sample(enc.ids, enc.mask, key, **sampling)
                n = len(rows)
                raw = rollouts.decode_responses(self.tokenizer, r_out.tokens[:n],
                                                r_out.lengths[:n])
                reflections, redactions = rollouts.guard_reflections(
                    raw, [golds[i] for i in rows], cfg.reflection.leak_guard)
                self.counters["redactions"] += redactions
                host.update(reflection_length_mean=float(np.mean(r_out.lengths[:n])),
                            redactions=redactions)
                messages = [amr_sd_teacher_prompt(questions[i], r, bool(verified.correct[i]))
                            for i, r in zip(rows, reflections)]
                full = [None] * B
                for i, r in zip(rows, reflections):
                    full[i] = r
                self.last_rollout["reflections"] = full
        host["reflected_frac"] = len(rows) / B
        if not len(rows):
            return None, rows
        padded = _bucket_rows(rows, self._row_quantum, B)
        messages = messages + [messages[0]] * (len(padded) - len(rows))
        enc = encode_chat(self.tokenizer, messages,
                          max_tokens=cfg.reflection.max_teacher_prompt_tokens,
                          system_prompt=cfg.model.system_prompt, on_long="truncate")
        self.counters["truncated_teacher_prompts"] = \
            self.counters.get("truncated_teacher_prompts", 0) + enc.truncated
        return (enc.ids, enc.mask, np.ones(len(padded), bool)), rows

    def train_step(self, step: int) -> dict[str, Any]:
        """Run iteration ``step`` (0-based) and return its metrics."""
        cfg = self.config
        G = cfg.rollout.group_size
        timer = PhaseTimer()
        key = jax.random.fold_in(self.run_key, step)
        k_roll, k_reflect, k_oar = jax.random.split(key, 3)

        with timer("generate"):
            idx = self.stream.next_batch()
            examples = [self.train_data.examples[i] for i in idx for _ in range(G)]
            prompt_rows = [self.train_data.prompt_tokens[i] for i in idx for _ in range(G)]
            prompt_ids, prompt_mask = left_padded(prompt_rows, self.train_data.width,
                                                  self.pad_id)
            # AMR-SD's follow-up reflection requests continue the rollouts' KV cache
            keep_cache = (self.method.teacher_context == "reflection"
                          and cfg.reflection.request == "follow_up"
                          and cfg.reflection.source == "self")
            out = self._sample(prompt_ids, prompt_mask, k_roll,
                               max_new_tokens=cfg.rollout.max_new_tokens,
                               temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                               top_k=cfg.rollout.top_k, keep_cache=keep_cache)
            out, kv_state = out if keep_cache else (out, None)
            texts = rollouts.decode_responses(self.tokenizer, out.tokens, out.lengths)
            golds = [str(ex["answer"]) for ex in examples]
            verified = rollouts.verify(texts, golds, reward=cfg.reward.name,
                                       format_weight=cfg.reward.format_weight,
                                       success_threshold=cfg.reward.success_threshold,
                                       timeout_s=cfg.reward.timeout_s,
                                       wall_timeout_s=cfg.reward.wall_timeout_s)
            self.counters["reward_errors"] += verified.errors
            rewards, response_mask = verified.rewards, out.mask
            if cfg.reward.on_error == "drop_group" and verified.errors:
                rewards, response_mask, dropped = rollouts.drop_failed_groups(
                    verified, out.mask, G)
                self.counters["dropped_groups"] = self.counters.get("dropped_groups", 0) \
                    + dropped
        batch = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
                 "response_ids": out.tokens, "response_mask": response_mask,
                 "rewards": rewards, "sampler_logprobs": out.logprobs}
        # kept for inspection (notebooks, tests): the step's texts and verifier results
        self.last_rollout = {"examples": examples, "texts": texts, "verified": verified}
        host = {"accuracy": float(verified.correct.mean()),
                "reward_errors": verified.errors}

        questions = [ex["prompt"] for ex in examples]
        teacher = teacher_rows = None
        if self.method.teacher_context == "reflection":
            with timer("reflect"):
                teacher, teacher_rows = self._reflection_teacher(
                    questions, texts, verified, rewards, golds, examples, k_reflect, host,
                    rollout=out, kv_state=kv_state)
        elif self.method.teacher_context is not None:
            with timer("reflect"):
                messages = rollouts.teacher_messages(
                    self.method.teacher_context, questions, texts, verified, G,
                    solutions=[ex.get("solution") for ex in examples])
                t_ids, t_mask, t_valid = self._teacher_tokens(messages, prompt_ids, prompt_mask)
                teacher = (t_ids, t_mask, t_valid)
                host["teacher_valid_frac"] = float(t_valid.mean())

        kv_state = None  # the rollout cache is not needed past the reflections
        with timer("score"):
            params = self.state.params
            lp_old, entropy = self.scorer(params, prompt_ids, prompt_mask, out.tokens,
                                          response_mask)
            batch["old_logprobs"] = lp_old
            if entropy is not None:
                batch["entropy"] = entropy
            if self.method.distillation:
                batch.update(teacher_prompt_ids=teacher[0], teacher_prompt_mask=teacher[1],
                             teacher_valid=teacher[2].astype(np.int32))
            elif teacher is not None or teacher_rows is not None:
                t_params = params if self.teacher_params is None else self.teacher_params
                if teacher_rows is None:
                    batch["teacher_logprobs"], _ = self.scorer(t_params, teacher[0], teacher[1],
                                                               out.tokens, response_mask)
                else:  # only the reflected rows; the rest keep lp_T = lp_old (CIG 0)
                    lp_t = _to_host(lp_old).copy()
                    if len(teacher_rows):
                        rows = _bucket_rows(teacher_rows, self._row_quantum, len(texts))
                        scored, _ = self.scorer(t_params, teacher[0], teacher[1],
                                                out.tokens[rows], response_mask[rows])
                        lp_t[teacher_rows] = _to_host(scored)[:len(teacher_rows)]
                        host.update(_reflection_gain(lp_t, _to_host(lp_old), response_mask,
                                                     verified.correct, teacher_rows))
                    batch["teacher_logprobs"] = lp_t
            if self.ref_params is not None:
                batch["ref_logprobs"], _ = self.scorer(self.ref_params, prompt_ids, prompt_mask,
                                                       out.tokens, response_mask)
            if self.method.passes & {"outcome_gradient", "outcome_perturbation"}:
                answer = rollouts.answer_token_mask(self.tokenizer, out.tokens, out.lengths,
                                                    verified.results)
                batch["importance"] = self._importance(batch, answer, k_oar)
            jax.block_until_ready(batch["old_logprobs"])
        # the update step's inputs (old/teacher log-probs, rewards ...), for inspection
        self.last_rollout["batch"] = batch

        with timer("update"):
            args = (self.teacher_params,) if self.method.distillation else ()
            self.state, device_metrics = self._step_fn(self.state, self._global(batch), *args)
            device_metrics = jax.device_get(device_metrics)
            nnx.update(self.model, self.state.params)
            skipped = bool(device_metrics["update_skipped"])
            if self.method.teacher_weights == "ema" and not skipped:
                self.teacher_params = self._ema(self.teacher_params, self.state.params)
        self.counters["consecutive_skips"] = self.counters["consecutive_skips"] + 1 \
            if skipped else 0
        self.counters["skipped_steps"] += int(skipped)

        metrics = {k: float(v) for k, v in device_metrics.items()}
        metrics.update(host)
        metrics.update(timer.pop())
        tokens = float(out.mask.sum())
        metrics["tokens_per_second"] = tokens / max(metrics["time/step"], 1e-9)
        metrics["epoch"] = self.stream.epoch
        return metrics

    # ------------------------------------------------------------------ eval / checkpoint
    def evaluate(self, step: int) -> dict[str, float] | None:
        if not self.eval_data.examples:
            return None
        from ..evaluation import EvalSettings, evaluate

        e = self.config.eval
        settings = EvalSettings(num_samples=e.num_samples, temperature=e.temperature,
                                max_new_tokens=e.max_new_tokens, batch_size=e.batch_size,
                                max_prompt_tokens=self.config.data.max_prompt_tokens,
                                on_long_prompt=self.config.data.on_long_prompt,
                                reward=self.config.reward.name,
                                success_threshold=self.config.reward.success_threshold,
                                system_prompt=self.config.model.system_prompt)
        nnx.update(self.model, self.state.params)
        t0 = time.perf_counter()
        key = jax.random.fold_in(jax.random.fold_in(self.run_key, 1_000_003), step)
        report = evaluate(self.model, self.tokenizer, self.eval_data.examples, key, settings,
                          render=lambda ex: ex["prompt"], mesh=self.mesh)
        metrics = dict(report.metrics)
        metrics["time/eval"] = time.perf_counter() - t0
        self.metrics.log(step, metrics, kind="eval")
        return metrics

    def save(self, step: int) -> None:
        """Checkpoint after ``step`` completed iterations."""
        if self.checkpointer is None:
            return
        self.checkpointer.save(step, train_state=self.state, teacher_params=self.teacher_params,
                               rng_key=self.run_key, data_state=self.stream.state_dict(),
                               config=self.config.to_dict(), extra=dict(self.counters))

    def _resume(self) -> None:
        latest = self.checkpointer.latest_step()
        if latest is None:
            dropped = self.metrics.truncate_after(-1)  # lines of a run killed before step 1
            self.log(f"--resume: no checkpoint in {self.output_dir / 'checkpoints'}; "
                     f"starting from step 0 ({dropped} earlier log lines dropped)")
            return
        restored = self._restore(self.checkpointer, latest)
        saved, now = restored.config, self.config.to_dict()
        changed = sorted(k for k in now if k not in ("steps", "progress") and
                         saved.get(k) != now[k])
        if changed:
            self.log(f"warning: resuming with config sections changed since the checkpoint: "
                     f"{changed}")
        self.run_key = restored.rng_key
        self.stream.load_state_dict(restored.data_state)
        self.counters.update(restored.extra)
        self.start_step = restored.step
        dropped = self.metrics.truncate_after(restored.step)
        self.log(f"resumed from step {restored.step} ({dropped} later log lines dropped)")

    def _check_fresh_output_dir(self) -> None:
        """A new run never mixes with an old one: checkpoints there are an error (resume or
        pick another output_dir); an old metrics file is kept under a new name."""
        if self.checkpointer is not None and self.checkpointer.all_steps():
            raise FileExistsError(
                f"{self.output_dir} already holds checkpoints {self.checkpointer.all_steps()} "
                "of another run; pass --resume to continue it, or set output_dir=... for a "
                "new run")
        if self.is_main and self.metrics.path.exists():
            kept = self.metrics.path.with_name(f"metrics.{int(time.time())}.jsonl")
            os.replace(self.metrics.path, kept)
            self.log(f"an earlier run's metrics were moved to {kept}")

    def _restore(self, checkpointer, step: int | None):
        """Load train state (and teacher weights) of ``step`` into this trainer."""
        from .checkpoint import abstract_like

        abstract_state = abstract_like(self.state, self.state_sharding)
        abstract_teacher = None
        if self.teacher_params is not None:
            abstract_teacher = abstract_like(self.teacher_params, self.state_sharding.params)
        restored = checkpointer.restore(step, abstract_train_state=abstract_state,
                                        abstract_teacher_params=abstract_teacher)
        self.state = restored.train_state
        if self.teacher_params is not None:
            self.teacher_params = restored.teacher_params
        nnx.update(self.model, self.state.params)
        return restored

    def restore_weights(self, run_dir: str | os.PathLike) -> int:
        """Evaluate-only: load the latest checkpoint of another run directory (or its
        ``checkpoints`` folder); returns its step."""
        from .checkpoint import RunCheckpointer

        path = Path(run_dir)
        if (path / "checkpoints").is_dir():
            path = path / "checkpoints"
        restored = self._restore(RunCheckpointer(path, async_save=False, read_only=True), None)
        self.start_step = restored.step
        return restored.step

    def _placeholder_batch(self) -> dict:
        B = self.config.rollout.batch_size
        return {k: np.zeros((B,) if k in ("rewards", "teacher_valid") else (B, 1), np.float32)
                for k in update_batch_keys(self.config)}

    def _global(self, batch: dict) -> dict:
        """Per-process rows -> global arrays (multi-host); single-process: unchanged."""
        if jax.process_count() == 1:
            return batch
        from ..update import batch_spec

        shardings = batch_spec(batch, self.mesh)
        return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v))
                for k, v in batch.items()}

    # ------------------------------------------------------------------ the loop
    def _on_sigterm(self, signum, frame):
        self._stop_requested = True
        self.log("SIGTERM: finishing this step, writing a checkpoint, then exiting")

    def run(self) -> dict[str, Any]:
        """Train from ``start_step`` to ``config.steps``; returns a summary."""
        cfg = self.config
        previous = signal.signal(signal.SIGTERM, self._on_sigterm) \
            if _main_thread() else None
        history: list[dict] = []
        bar = None
        if cfg.progress and self.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=self.start_step, desc=f"train {cfg.method}",
                       unit="step", dynamic_ncols=True)
        last_eval, eval_step = None, None
        try:
            if cfg.eval.at_start and self.start_step == 0:
                last_eval, eval_step = self.evaluate(0), 0
            step = self.start_step
            while step < cfg.steps:
                metrics = self.train_step(step)
                step += 1
                # run totals next to the step's own counts (redactions, reward_errors ...)
                metrics.update({f"total/{k}": v for k, v in self.counters.items()})
                record = self.metrics.log(step, metrics)
                history.append(record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}",
                                    acc=f"{metrics['accuracy']:.2f}",
                                    len=f"{metrics['response_length_mean']:.0f}",
                                    s=f"{metrics['time/step']:.1f}")
                if self.counters["consecutive_skips"] >= cfg.max_consecutive_skips:
                    raise TrainingStopped(
                        f"{self.counters['consecutive_skips']} consecutive steps had non-finite "
                        f"loss or gradients (step {step}); stopping. The last good checkpoint "
                        f"in {self.output_dir / 'checkpoints'} is intact; lower the learning "
                        "rate or check the rewards, then --resume")
                if cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.steps:
                    last_eval, eval_step = self.evaluate(step), step
                if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or \
                        self._stop_requested:
                    self.save(step)
                if self._stop_requested:
                    self.log(f"stopped after step {step} on SIGTERM; checkpoint saved")
                    break
            else:
                if cfg.eval.at_end:
                    last_eval, eval_step = self.evaluate(step), step
                if cfg.checkpoint.save_at_end and not (
                        cfg.checkpoint.every and step % cfg.checkpoint.every == 0):
                    self.save(step)
        finally:
            if bar is not None:
                bar.close()
            if self.checkpointer is not None:
                self.checkpointer.wait_until_finished()
            self.metrics.flush()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        return {"history": history, "eval": last_eval, "eval_step": eval_step,
                "output_dir": str(self.output_dir),
                "metrics_path": str(self.metrics.path),
                "checkpoint_dir": str(self.output_dir / "checkpoints")}

    def close(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.close()
        self.metrics.close()


def _reflection_gain(lp_teacher, lp_old, mask, correct, rows) -> dict[str, float]:
    """Hint-quality diagnostic: mean per-token gain ``lp_T - lp_old`` (nats, unclipped) of
    the reflected rows, split by outcome. A useful hint raises the likelihood of a correct
    rollout (> 0); a useful critique lowers that of an incorrect one (< 0)."""
    out = {}
    gain = (lp_teacher - lp_old)[rows]
    mask = np.asarray(mask)[rows].astype(bool)
    ok = np.asarray(correct)[rows].astype(bool)
    for name, sel in (("correct", ok), ("incorrect", ~ok)):
        m = mask & sel[:, None]
        if m.any():
            out[f"reflection_gain_{name}"] = float(gain[m].mean())
    return out


def _bucket_rows(rows: np.ndarray, quantum: int, limit: int) -> np.ndarray:
    """``rows`` padded (repeating its first entry) to ``min(quantum * 2**k, limit)``
    entries, so the reflection sampler and the teacher scorer compile for a few batch sizes
    only. ``quantum`` divides ``limit`` (the step's rows) and is a multiple of the mesh's
    batch axes, so every bucket shards evenly."""
    n = max(len(rows), 1)
    size = quantum
    while size < n:
        size *= 2
    size = max(min(size, limit), n)
    return np.concatenate([rows, np.full(size - len(rows), rows[0] if len(rows) else 0,
                                         rows.dtype if len(rows) else np.int64)])


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def train(config: TrainConfig, *, resume: bool = False, **kwargs) -> dict[str, Any]:
    """Build a :class:`Trainer`, run it, close it; returns :meth:`Trainer.run`'s summary."""
    maybe_initialize_distributed()
    trainer = Trainer(config, resume=resume, **kwargs)
    try:
        return trainer.run()
    finally:
        trainer.close()
