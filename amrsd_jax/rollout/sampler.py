"""Batched, jitted autoregressive sampling with a static-shape KV cache.

One compiled program per (bucketed prompt length, bucketed max new tokens, batch, sampling
mode): prefill writes the left-padded prompt into cache slots ``[0, P)``, then a
``lax.while_loop`` decodes one token per step into slots ``P, P+1, ...`` and stops as soon
as every row has produced one of its stop tokens.

``generate(..., return_state=True)`` also returns the cache (:class:`KVState`), and
:func:`continue_generation` appends a follow-up turn to chosen rows and samples after it,
prefilling only the new tokens: AMR-SD's reflection request reuses the rollout's cache.

Log-probs returned are those of the distribution the token was drawn from *before*
top-k/top-p truncation: ``log_softmax(logits / temperature)`` (``log_softmax(logits)`` when
greedy). That is the policy's own probability at that temperature, the quantity an
importance ratio against the trainer's recomputed log-probs needs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..hlo import TOKEN_LOOP
from ..models.decoder import Decoder, init_cache, positions_from_mask
from ..sharding import (DEFAULT_RULES, ROLLOUT_RULES, activation_layout, batch_sharding,
                        replicated, rollout_weights, shard_batch)

# ~1.5x apart: padding wastes at most a third of the compute, and a run still compiles only
# a handful of programs
DEFAULT_BUCKETS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072,
                   4096, 6144, 8192)


def resolve_pad_id(source) -> int:
    """The one pad-id rule, for a tokenizer or a model config: its pad token, else its
    (first) EOS, else 0. Pad positions are always masked, so the value only has to be a
    valid token id."""
    for value in (getattr(source, "pad_token_id", None), getattr(source, "eos_token_id", None)):
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


def resolve_stop_ids(tokenizer, model_config) -> list[int]:
    """Tokens that end a response: the model's EOS ids and the tokenizer's EOS."""
    extra = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return sorted({*model_config.eos_token_ids, *extra})


def bucket_length(n: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> int:
    """Smallest bucket ``>= n`` (multiples of the largest bucket beyond it)."""
    for b in buckets:
        if n <= b:
            return b
    top = buckets[-1]
    return -(-n // top) * top


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to pick each next token.

    ``temperature=0`` or ``greedy=True`` is argmax decoding; ``top_k=0`` and ``top_p=1``
    disable those filters.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0


class SampleOutput(NamedTuple):
    """Sampler results; ``N`` is ``max_new_tokens``.

    tokens: ``[batch, N]`` int32, ``pad_id`` after the row stopped.
    mask: ``[batch, N]`` int32, 1 for response tokens (the stop token included).
    logprobs: ``[batch, N]`` float32 sampler log-probs (0 where ``mask == 0``).
    lengths: ``[batch]`` number of response tokens.
    num_steps: scalar, decode-loop iterations run (< N when every row stopped early).
    """

    tokens: jax.Array
    mask: jax.Array
    logprobs: jax.Array
    lengths: jax.Array
    num_steps: jax.Array


def _filter_logits(logits: jax.Array, top_k: int, top_p: float | jax.Array,
                   use_top_p: bool) -> jax.Array:
    """Mask logits ``[batch, vocab]`` outside the top-k / nucleus set to ``-inf``."""
    neg = jnp.finfo(logits.dtype).min
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if use_top_p:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        kept = jnp.where(mass_before < top_p, sorted_logits, jnp.inf)
        cutoff = jnp.min(kept, axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, neg, logits)
    return logits


def sample_categorical(key: jax.Array, logits: jax.Array) -> jax.Array:
    """One draw per row from ``softmax(logits)`` ``[batch, vocab]`` -> ``[batch]``.

    Inverse-CDF sampling with one uniform per row. ``jax.random.categorical`` draws a Gumbel
    variate per vocabulary entry (49k threefry calls per row), which costs more than the
    model's own decode step on CPU; this needs ``batch`` random numbers and a cumsum.
    Tokens with probability 0 (filtered by top-k/top-p) are never drawn.
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    cdf = jnp.cumsum(probs, axis=-1)
    u = jax.random.uniform(key, (logits.shape[0], 1), jnp.float32) * cdf[:, -1:]
    token = jnp.sum(cdf <= u, axis=-1)
    return jnp.minimum(token, logits.shape[-1] - 1)


def _next_token(logits, key, temperature, top_p, *, greedy, top_k, use_top_p):
    """Token ``[batch]`` and its log-prob under ``softmax(logits / temperature)``."""
    if greedy:
        token = jnp.argmax(logits, axis=-1)
        logp = jax.nn.log_softmax(logits, axis=-1)
    else:
        scaled = logits / temperature
        logp = jax.nn.log_softmax(scaled, axis=-1)
        token = sample_categorical(key, _filter_logits(scaled, top_k, top_p, use_top_p))
    token = token.astype(jnp.int32)
    return token, jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]


class KVState(NamedTuple):
    """The sampler's KV cache after a generation, to continue the same rows later.

    cache: the stacked :class:`~amrsd_jax.models.decoder.KVCache`,
      ``[layers, batch, slots, kv_heads, head_dim]``.
    kv_mask: ``[batch, slots]`` 1 for the slots holding the prompt and the response tokens
      (slots after a row stopped hold junk and are 0).
    next_pos: ``[batch]`` RoPE position of the row's next token (prompt + response length).
    """

    cache: tuple
    kv_mask: jax.Array
    next_pos: jax.Array


def _prefill_and_decode(model, pick, input_ids, positions, cache, kv_mask, first_slot,
                        next_pos, key, stop_ids, temperature, top_p, new_token_limit, pad_id,
                        max_new_tokens):
    """Prefill left-padded ``input_ids`` into cache slots ``first_slot, ...``, draw the first
    new token, then decode one token per step until every row stopped or the limit is
    reached. ``kv_mask`` covers every slot; ``next_pos [batch]`` is the position of the first
    new token. Returns ``(SampleOutput, cache)``."""
    hidden, cache = model.hidden_states(model.embed(input_ids), kv_mask, positions=positions,
                                        cache=cache, cache_index=first_slot)
    key, sub = jax.random.split(key)
    # left padding puts every row's last input token in the last column: only its logits
    token, logp = pick(model.logits(hidden[:, -1]), sub, temperature, top_p)
    first_slot = first_slot + input_ids.shape[1]
    batch = token.shape[0]
    tokens = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)
    logprobs = jnp.zeros((batch, max_new_tokens), jnp.float32)
    resp_mask = jnp.zeros((batch, max_new_tokens), jnp.int32)
    done = jnp.zeros((batch,), bool)

    def cond(carry):
        i, done = carry[0], carry[5]
        return (i < new_token_limit) & ~jnp.all(done)

    def body(carry):
        i, token, logp, pos, kv_mask, done, cache, tokens, logprobs, resp_mask, key = carry
        live = ~done
        tokens = tokens.at[:, i].set(jnp.where(live, token, pad_id))
        logprobs = logprobs.at[:, i].set(jnp.where(live, logp, 0.0))
        resp_mask = resp_mask.at[:, i].set(live.astype(jnp.int32))
        done = done | jnp.any(token[:, None] == stop_ids, axis=-1)
        # feed the token just emitted to get the distribution of the next one
        slot = first_slot + i
        kv_mask = kv_mask.at[:, slot].set(1)
        logits, cache = model.forward(token[:, None], kv_mask, positions=pos[:, None],
                                      cache=cache, cache_index=slot)
        key, sub = jax.random.split(key)
        token, logp = pick(logits[:, 0], sub, temperature, top_p)
        return (i + 1, token, logp, pos + 1, kv_mask, done, cache, tokens, logprobs,
                resp_mask, key)

    carry = (jnp.int32(0), token, logp, next_pos, kv_mask, done, cache, tokens, logprobs,
             resp_mask, key)
    with jax.named_scope(TOKEN_LOOP):  # names the loop in the compiled HLO (amrsd_jax.hlo)
        carry = jax.lax.while_loop(cond, body, carry)
    tokens, logprobs, resp_mask = carry[7], carry[8], carry[9]
    out = SampleOutput(tokens, resp_mask, logprobs, jnp.sum(resp_mask, axis=-1), carry[0])
    return out, carry[6]


def _final_state(cache, context_mask, out: SampleOutput) -> KVState:
    """The cache with only the context and the recorded response tokens marked valid."""
    kv_mask = jnp.concatenate([context_mask.astype(jnp.int32), out.mask], axis=1)
    return KVState(cache, kv_mask, jnp.sum(kv_mask, axis=-1).astype(jnp.int32))


def _sampling_model(graphdef, state, mesh, reshard_weights: bool) -> Decoder:
    """The model a sampling program decodes with: with a mesh and ``reshard_weights``, its
    weights in the rollout layout (:func:`amrsd_jax.sharding.rollout_weights`), gathered
    once per call rather than once per token."""
    model: Decoder = nnx.merge(graphdef, state)
    if mesh is None or not reshard_weights:
        return model
    return nnx.merge(graphdef, rollout_weights(state, mesh, model.config.dtype))


def _sampling_layout(mesh, reshard_weights: bool):
    """Activations pinned to ``mesh`` under the rules of the weights they meet: the rollout
    layout's when the weights are resharded (a token lookup then stays in the batch layout
    instead of pulling the whole table back to the training split every token)."""
    return activation_layout(mesh, ROLLOUT_RULES if reshard_weights else DEFAULT_RULES)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "greedy", "top_k",
                                             "use_top_p", "return_state", "mesh",
                                             "reshard_weights"))
def _generate(graphdef, state, prompt_ids, prompt_mask, stop_ids, key, temperature, top_p,
              new_token_limit, pad_id, *, max_new_tokens, greedy, top_k, use_top_p,
              return_state=False, mesh=None, reshard_weights=True):
    # activations (the stacked KV cache, q/k/v, logits) are pinned to `mesh` while tracing
    with _sampling_layout(mesh, reshard_weights):
        model = _sampling_model(graphdef, state, mesh, reshard_weights)
        batch, prompt_len = prompt_ids.shape
        slots = prompt_len + max_new_tokens
        pick = functools.partial(_next_token, greedy=greedy, top_k=top_k, use_top_p=use_top_p)

        cache = init_cache(model.config, batch, slots)
        kv_mask = jnp.concatenate(
            [prompt_mask.astype(jnp.int32), jnp.zeros((batch, max_new_tokens), jnp.int32)], axis=1)
        next_pos = jnp.sum(prompt_mask, axis=-1).astype(jnp.int32)
        out, cache = _prefill_and_decode(
            model, pick, prompt_ids, positions_from_mask(prompt_mask), cache, kv_mask, 0, next_pos,
            key, stop_ids, temperature, top_p, new_token_limit, pad_id, max_new_tokens)
        if not return_state:
            return out
        return out, _final_state(cache, prompt_mask, out)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "greedy", "top_k",
                                             "use_top_p", "mesh", "reshard_weights"))
def _continue(graphdef, state, prior: KVState, rows, suffix_ids, suffix_mask, stop_ids, key,
              temperature, top_p, new_token_limit, pad_id, *, max_new_tokens, greedy, top_k,
              use_top_p, mesh=None, reshard_weights=True):
    with _sampling_layout(mesh, reshard_weights):
        model = _sampling_model(graphdef, state, mesh, reshard_weights)
        batch, suffix_len = suffix_ids.shape
        pick = functools.partial(_next_token, greedy=greedy, top_k=top_k, use_top_p=use_top_p)
        # the chosen rows' caches, with room for the suffix and the new tokens after them
        extra = suffix_len + max_new_tokens
        cache = jax.tree.map(  # [layers, batch, slots, ...]: rows on axis 1, slots on axis 2
            lambda c: jnp.pad(jnp.take(c, rows, axis=1),
                              ((0, 0), (0, 0), (0, extra)) + ((0, 0),) * (c.ndim - 3)), prior.cache)
        first = prior.kv_mask.shape[1]
        kv_mask = jnp.concatenate([jnp.take(prior.kv_mask, rows, axis=0),
                                   suffix_mask.astype(jnp.int32),
                                   jnp.zeros((batch, max_new_tokens), jnp.int32)], axis=1)
        start = jnp.take(prior.next_pos, rows)
        # the suffix continues each row's positions; the hole between a row's last token and
        # its (left-padded) suffix is masked out, so it costs compute but changes nothing
        positions = start[:, None] + positions_from_mask(suffix_mask)
        next_pos = start + jnp.sum(suffix_mask, axis=-1).astype(jnp.int32)
        out, _ = _prefill_and_decode(model, pick, suffix_ids, positions, cache, kv_mask, first,
                                     next_pos, key, stop_ids, temperature, top_p, new_token_limit,
                                     pad_id, max_new_tokens)
        return out


def _stop_matrix(stop_tokens, batch: int) -> np.ndarray:
    """Per-row stop ids ``[batch, K]`` padded with -1 (never a token id)."""
    if stop_tokens is None:
        rows = [[] for _ in range(batch)]
    elif len(stop_tokens) and isinstance(stop_tokens[0], (list, tuple, np.ndarray)):
        if len(stop_tokens) != batch:
            raise ValueError(f"per-row stop_tokens has {len(stop_tokens)} rows, batch is {batch}")
        rows = [list(r) for r in stop_tokens]
    else:
        rows = [list(stop_tokens) for _ in range(batch)]
    width = max(1, max(len(r) for r in rows))
    out = np.full((batch, width), -1, np.int32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def left_pad_to(ids: np.ndarray, mask: np.ndarray, length: int, pad_id: int):
    """Left-pad ``[batch, time]`` arrays to ``[batch, length]``."""
    extra = length - ids.shape[1]
    if extra < 0:
        raise ValueError(f"prompt length {ids.shape[1]} exceeds bucket {length}")
    ids = np.pad(np.asarray(ids), ((0, 0), (extra, 0)), constant_values=pad_id)
    mask = np.pad(np.asarray(mask), ((0, 0), (extra, 0)), constant_values=0)
    return ids.astype(np.int32), mask.astype(np.int32)


def generate(model: Decoder, prompt_ids, prompt_mask, key: jax.Array,
             config: SamplingConfig = SamplingConfig(), *, stop_tokens=None,
             pad_id: int | None = None, buckets: Sequence[int] | None = DEFAULT_BUCKETS,
             mesh=None, return_state: bool = False, reshard_weights: bool = True):
    """Sample continuations of left-padded prompts.

    Args:
      model: the policy (its current parameters are used; nothing is copied).
      prompt_ids, prompt_mask: ``[batch, time]`` left-padded prompt tokens and mask.
      key: PRNG key; the same key gives the same tokens.
      config: :class:`SamplingConfig`.
      stop_tokens: ids that end a row (e.g. ``[eos]``), or one list per row; defaults to
        the model's ``eos_token_id``.
      buckets: prompt length and ``max_new_tokens`` are rounded up to these sizes so a run
        compiles a handful of programs; ``None`` disables bucketing.
      mesh: if given, the batch is split over its ``data`` x ``fsdp`` axes (parameters
        should already be sharded with :func:`amrsd_jax.sharding.shard_model`).
      return_state: also return the :class:`KVState`, to continue these rows with
        :func:`continue_generation` without recomputing their prompt and response.
      reshard_weights: with a mesh, decode with the weights in the rollout layout (whole on
        each data x fsdp device, split over tensor only, in the compute dtype): one gather
        per call instead of weight collectives at every token. ``False`` decodes in the
        weights' own (training) layout, for a model too large to hold that way.

    Returns:
      :class:`SampleOutput` with ``N = config.max_new_tokens`` columns (and the
      :class:`KVState` with ``return_state``).
    """
    prompt_ids, prompt_mask = np.asarray(prompt_ids), np.asarray(prompt_mask)
    if prompt_ids.ndim != 2 or prompt_ids.shape != prompt_mask.shape:
        raise ValueError(f"prompt_ids {prompt_ids.shape} and prompt_mask {prompt_mask.shape} "
                         "must both be [batch, time]")
    ids, mask, stops, pad_id, new_tokens = _host_inputs(
        model.config, prompt_ids, prompt_mask, config, stop_tokens, pad_id, buckets)
    if mesh is not None:
        ids, mask, stops = shard_batch((ids, mask, stops), mesh)
    graphdef, state = nnx.split(model)
    out = _generate(graphdef, state, ids, mask, stops, key, *_sampling_args(config, pad_id),
                    **_static_args(config, new_tokens, return_state, mesh, reshard_weights))
    if return_state:
        out, kv_state = out
        return _trim(out, config.max_new_tokens), kv_state
    return _trim(out, config.max_new_tokens)


def continue_generation(model: Decoder, prior: KVState, rows, suffix_ids, suffix_mask,
                        key: jax.Array, config: SamplingConfig = SamplingConfig(), *,
                        stop_tokens=None, pad_id: int | None = None,
                        buckets: Sequence[int] | None = DEFAULT_BUCKETS,
                        mesh=None, reshard_weights: bool = True) -> SampleOutput:
    """Append ``suffix`` tokens to earlier generations and sample after them.

    The prompt and response of each chosen row are already in ``prior``'s KV cache (from
    ``generate(..., return_state=True)``), so only the suffix is prefilled: a follow-up
    turn costs its own tokens, not the whole conversation again. Equivalent to
    :func:`generate` on ``prompt + response + suffix`` (same tokens under greedy decoding).
    ``prior`` is read, not donated: the continuation's cache is a gather of the chosen rows
    with room for the new tokens, a new shape that could not reuse its buffer, and ``prior``
    may be continued again; drop it after its last continuation to free it.

    Args:
      prior: the :class:`KVState` of the earlier generation, ``[B, slots]``.
      rows: ``[batch]`` indices into ``prior`` (repeats allowed).
      suffix_ids, suffix_mask: ``[batch, S]`` left-padded tokens to append to each row
        (e.g. the end of the assistant turn, a new user turn and the assistant header).

    Returns:
      :class:`SampleOutput` of the new tokens, ``N = config.max_new_tokens`` columns.
    """
    suffix_ids, suffix_mask = np.asarray(suffix_ids), np.asarray(suffix_mask)
    rows = np.asarray(rows, np.int32)
    if suffix_ids.ndim != 2 or suffix_ids.shape != suffix_mask.shape \
            or rows.shape != suffix_ids.shape[:1]:
        raise ValueError(f"rows {rows.shape}, suffix_ids {suffix_ids.shape} and suffix_mask "
                         f"{suffix_mask.shape} must be [batch] and [batch, time]")
    ids, mask, stops, pad_id, new_tokens = _host_inputs(
        model.config, suffix_ids, suffix_mask, config, stop_tokens, pad_id, buckets)
    if mesh is not None:
        ids, mask, stops, rows = shard_batch((ids, mask, stops, rows), mesh)
    graphdef, state = nnx.split(model)
    out = _continue(graphdef, state, prior, rows, ids, mask, stops, key,
                    *_sampling_args(config, pad_id), max_new_tokens=new_tokens,
                    greedy=config.is_greedy, top_k=config.top_k, use_top_p=config.top_p < 1.0,
                    mesh=mesh, reshard_weights=reshard_weights)
    return _trim(out, config.max_new_tokens)


def lower_generate(graphdef, state, batch: int, prompt_len: int, config: SamplingConfig, *,
                   num_stop_ids: int, mesh, buckets: Sequence[int] | None = DEFAULT_BUCKETS,
                   return_state: bool = False, reshard_weights: bool = True):
    """Lower the program :func:`generate` runs for ``batch`` prompts of ``prompt_len``
    tokens, from abstract inputs: ``state`` may hold sharded ``ShapeDtypeStruct`` leaves
    (``nnx.split`` of an ``nnx.eval_shape`` model), so no weights are needed."""
    width = bucket_length(prompt_len, buckets) if buckets else prompt_len
    new_tokens = (bucket_length(config.max_new_tokens, buckets) if buckets
                  else config.max_new_tokens)
    rows, rep = batch_sharding(mesh, 2), replicated(mesh)
    ids = jax.ShapeDtypeStruct((batch, width), jnp.int32, sharding=rows)
    stops = jax.ShapeDtypeStruct((batch, max(1, num_stop_ids)), jnp.int32, sharding=rows)
    key = jax.eval_shape(lambda: jax.random.key(0))
    key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=rep)
    scalars = [jax.ShapeDtypeStruct((), a.dtype, sharding=rep)
               for a in jax.eval_shape(lambda: _sampling_args(config, 0))]
    return _generate.lower(graphdef, state, ids, ids, stops, key, *scalars,
                           **_static_args(config, new_tokens, return_state, mesh,
                                          reshard_weights))


def _static_args(config: SamplingConfig, new_tokens: int, return_state: bool, mesh,
                 reshard_weights: bool) -> dict:
    """The compile-time arguments of :func:`_generate` for a sampling config (and the mesh
    its activations are laid out on, or ``None``, and the weights' layout)."""
    return dict(max_new_tokens=new_tokens, greedy=config.is_greedy, top_k=config.top_k,
                use_top_p=config.top_p < 1.0, return_state=return_state, mesh=mesh,
                reshard_weights=reshard_weights)


def _host_inputs(cfg, ids, mask, config: SamplingConfig, stop_tokens, pad_id, buckets):
    """Bucketed, left-padded ``ids, mask``, the stop matrix, the pad id and the bucketed
    number of new tokens (defaults from the model config)."""
    if pad_id is None:
        pad_id = resolve_pad_id(cfg)
    if stop_tokens is None:
        stop_tokens = list(cfg.eos_token_ids)
    width = bucket_length(ids.shape[1], buckets) if buckets else ids.shape[1]
    new_tokens = bucket_length(config.max_new_tokens, buckets) if buckets else config.max_new_tokens
    ids, mask = left_pad_to(ids, mask, width, pad_id)
    return ids, mask, _stop_matrix(stop_tokens, ids.shape[0]), pad_id, new_tokens


def _sampling_args(config: SamplingConfig, pad_id: int) -> tuple:
    """``temperature, top_p, new_token_limit, pad_id`` as traced scalars."""
    return (jnp.float32(max(config.temperature, 1e-6)), jnp.float32(config.top_p),
            jnp.int32(config.max_new_tokens), jnp.int32(pad_id))


def _trim(out: SampleOutput, n: int) -> SampleOutput:
    """Drop the columns the bucketed ``max_new_tokens`` added."""
    return SampleOutput(out.tokens[:, :n], out.mask[:, :n], out.logprobs[:, :n], out.lengths,
                        out.num_steps)
