"""The run's programs, built once: sampler, continuation, scorers, the update step and the
method's own programs, for one model (or its abstract shapes), mesh and step config.

The trainer, the dry run, test-time self-distillation and the benchmarks all call
:func:`build_programs`, so the dry run lowers exactly the programs the trainer runs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from .batch import UpdateBatch
from .distributed import check_agreement, placed, to_host
from .methods.base import Method
from .models.decoder import Decoder
from .rollout.sampler import (KVState, SampleOutput, SamplingConfig, continue_generation,
                              generate, lower_generate)
from .scoring import make_scorer
from .sharding import shard_batch, state_shardings
from .update import StepConfig, TrainState, init_train_state, make_update_step, place_state


def use_compilation_cache(directory: str, *, min_compile_time_s: float = 1.0) -> None:
    """JAX's persistent compilation cache in ``directory`` (a local path or gs://): every
    program that took at least ``min_compile_time_s`` to compile is stored there and loaded,
    not compiled, by a later process with the same program (a run restarted after a
    preemption, the next seed of a comparison). Takes effect for the whole process."""
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_s))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@dataclasses.dataclass(frozen=True)
class ProgramBuilder:
    """What a method's ``extra_programs`` hook gets to build its own jitted programs."""

    graphdef: Any
    other: Any
    mesh: Mesh
    pad_id: int
    vocab_chunk: int | None


@dataclasses.dataclass
class Programs:
    """Compiled-once programs of a run (jit caches one executable per input shape).

    update: ``(state, batch, teacher) -> (state, teacher, metrics)``, the one update step.
    score / score_old: ``(params, prompt_ids, prompt_mask, response_ids, response_mask) ->
      (logprobs [B, N], entropy [B, N] or None)``; ``score_old`` also returns entropies
      when the method reads them (one forward for both).
    extra: the method's own programs (``Method.extra_programs``).
    batch: the update step's abstract :class:`UpdateBatch` (which fields it takes).
    """

    model: Decoder
    mesh: Mesh
    step: StepConfig
    optimizer: optax.GradientTransformation
    update: Callable
    state_sharding: TrainState
    score: Callable
    score_old: Callable
    extra: dict[str, Callable]
    batch: UpdateBatch
    pad_id: int
    stop_ids: list[int]
    reshard_weights: bool = True  # sampling in the rollout layout (see generate)

    @property
    def method(self) -> Method:
        return self.step.method

    def init_state(self) -> TrainState:
        """A fresh train state from the model's current weights, on the mesh. It shares the
        model's buffers (no second copy): the update step donates them, and the model is
        given the new weights after every step."""
        return place_state(init_train_state(self.model, self.optimizer), self.state_sharding)

    def sample(self, params, prompt_ids, prompt_mask, key, sampling: SamplingConfig, *,
               keep_cache: bool = False) -> SampleOutput | tuple[SampleOutput, KVState]:
        """Host-side :class:`SampleOutput` of the policy ``params``; with ``keep_cache``
        also the device-side :class:`KVState` to continue these rows (:meth:`continue_`)."""
        check_agreement("the sampler's input shape", np.shape(prompt_ids))
        nnx.update(self.model, params)
        out = generate(self.model, prompt_ids, prompt_mask, key, sampling,
                       stop_tokens=self.stop_ids, pad_id=self.pad_id, mesh=self.mesh,
                       return_state=keep_cache, reshard_weights=self.reshard_weights)
        if keep_cache:
            return jax.tree.map(to_host, out[0]), out[1]
        return jax.tree.map(to_host, out)

    def continue_(self, params, kv_state: KVState, rows, suffix_ids, suffix_mask, key,
                  sampling: SamplingConfig) -> SampleOutput:
        """Continue ``rows`` of an earlier :meth:`sample` after ``suffix`` tokens (host)."""
        check_agreement("the continuation's input shape", np.shape(suffix_ids))
        nnx.update(self.model, params)
        out = continue_generation(self.model, kv_state, rows, suffix_ids, suffix_mask, key,
                                  sampling, stop_tokens=self.stop_ids, pad_id=self.pad_id,
                                  mesh=self.mesh, reshard_weights=self.reshard_weights)
        return jax.tree.map(to_host, out)

    def lower_sample(self, rows: int, prompt_len: int, sampling: SamplingConfig):
        """The lowered sampling program for ``rows`` prompts of ``prompt_len`` tokens, from
        the model's (possibly abstract) state with its shardings."""
        graphdef, state = nnx.split(self.model)
        state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                             state, state_shardings(state, self.mesh))
        return lower_generate(graphdef, state, rows, prompt_len, sampling,
                              num_stop_ids=len(self.stop_ids), mesh=self.mesh,
                              reshard_weights=self.reshard_weights)


def build_programs(model: Decoder, mesh: Mesh, *, step: StepConfig,
                   optimizer: optax.GradientTransformation, batch: UpdateBatch, pad_id: int,
                   stop_ids: Sequence[int], reshard_weights: bool = True) -> Programs:
    """Every program of a run, for ``model`` (real or ``nnx.eval_shape``-abstract, already
    sharded on ``mesh``) and the update step's ``batch`` fields (host or abstract arrays);
    ``reshard_weights``: the samplers decode in the rollout layout (``rollout.reshard_weights``)."""
    graphdef, _, other = nnx.split(model, nnx.Param, ...)
    method = step.method
    update, state_sharding = make_update_step(model, optimizer, step, mesh, batch)
    score = make_scorer(model, mesh, vocab_chunk=step.vocab_chunk, temperature=step.temperature)
    # the old-policy pass also returns per-token entropies when the batch takes them
    score_old = (make_scorer(model, mesh, vocab_chunk=step.vocab_chunk, with_entropy=True,
                             temperature=step.temperature)
                 if batch.entropy is not None else score)
    extra = method.extra_programs(ProgramBuilder(graphdef, other, mesh, pad_id,
                                                 step.vocab_chunk))
    # host rows (prompts, responses, masks) go on the mesh batch-first on every process
    on_mesh = functools.partial(placed, place=functools.partial(shard_batch, mesh=mesh))
    score, score_old = on_mesh(score), on_mesh(score_old)
    extra = {name: on_mesh(fn) for name, fn in extra.items()}
    return Programs(model, mesh, step, optimizer, update, state_sharding, score, score_old,
                    extra, batch, int(pad_id), sorted(int(i) for i in stop_ids),
                    reshard_weights)
