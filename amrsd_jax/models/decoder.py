"""Flax NNX decoder for the Llama / SmolLM / Qwen2 / Qwen3 family.

Module and attribute names mirror Hugging Face (``embed_tokens``, ``layers[i].self_attn.q_proj``
...) so that checkpoint conversion is a rename plus a transpose. Every parameter carries
logical sharding names (``vocab``, ``embed``, ``heads``, ``kv_heads``, ``mlp``, ``norm``) that
one rule table in :mod:`amrsd_jax.sharding` maps onto the mesh axes ``data``/``fsdp``/``tensor``.

The KV cache is a plain pytree passed in and returned (no hidden module state), so the
same module serves training (no cache) and jitted sampling (static-shape cache).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from .config import DecoderConfig, rope_inverse_frequencies


def _meta(*names):
    # eager_sharding=False: create unsharded; placement happens once, from the rule table.
    return {"out_sharding": names, "eager_sharding": False}


class LayerCache(NamedTuple):
    """Keys and values of one layer: ``[batch, slots, kv_heads, head_dim]`` each."""

    k: jax.Array
    v: jax.Array


def init_cache(cfg: DecoderConfig, batch: int, slots: int, dtype=None) -> tuple[LayerCache, ...]:
    """Zero KV cache with ``slots`` positions for every layer."""
    dtype = dtype or cfg.dtype
    shape = (batch, slots, cfg.num_kv_heads, cfg.head_dim)
    return tuple(LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
                 for _ in range(cfg.num_layers))


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """RoPE positions ``[batch, time]`` for left-padded rows: index among real tokens."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def attention_mask(kv_mask: jax.Array, query_slots: jax.Array) -> jax.Array:
    """Boolean attention mask ``[batch, 1, q_time, slots]``.

    A query in slot ``q`` sees valid key slots ``s <= q``. Every query also sees its own
    slot so that padded query rows stay finite (their outputs are never used).
    """
    slots = jnp.arange(kv_mask.shape[-1])
    causal = slots[None, :] <= query_slots[:, None]  # [q_time, slots]
    own = slots[None, :] == query_slots[:, None]
    mask = (kv_mask[:, None, :].astype(bool) & causal[None]) | own[None]
    return mask[:, None, :, :]


def rotary_tables(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``cos, sin`` of shape ``[batch, time, 1, head_dim]`` (float32, half-split layout)."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, Dh/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x [batch, time, heads, head_dim]`` (Hugging Face ``rotate_half`` layout)."""
    half = x.shape[-1] // 2
    x32 = x.astype(jnp.float32)
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention ``[batch, q_time, heads, head_dim]``.

    ``k, v``: ``[batch, slots, kv_heads, head_dim]``; ``mask``: ``[batch, 1, q_time, slots]``.
    Multi-token inputs go through ``jax.nn.dot_product_attention``. A single decode token
    uses a broadcast-multiply-reduce instead: with one query per row the score "matmuls"
    are ``batch x kv_heads`` tiny dots, which XLA's CPU backend runs one by one (~4x slower
    here); the reduction form fuses into one loop and is memory-bound on any backend, as
    decode attention is anyway.
    """
    if q.shape[1] != 1:
        return jax.nn.dot_product_attention(q, k, v, mask=mask)
    b, _, n, hd = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, 1, kv, n // kv, hd).astype(jnp.float32)
    scores = jnp.sum(qg * k.astype(jnp.float32)[:, :, :, None, :], axis=-1) / jnp.sqrt(
        jnp.float32(hd))  # [b, slots, kv, group]
    scores = jnp.where(mask[:, 0, 0, :, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=1)
    out = jnp.sum(probs[..., None] * v.astype(jnp.float32)[:, :, :, None, :], axis=1)
    return out.reshape(b, 1, n, hd).astype(q.dtype)


class RMSNorm(nnx.Module):
    """Root-mean-square norm computed in float32, as in the Hugging Face reference."""

    def __init__(self, dim: int, eps: float, *, param_dtype, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), **_meta("norm"))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return x32.astype(self.dtype) * self.weight[...].astype(self.dtype)


def _linear(cfg: DecoderConfig, din: int, dout: int, names: tuple, bias: bool, rngs: nnx.Rngs):
    return nnx.Linear(
        din, dout, use_bias=bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        kernel_init=nnx.initializers.normal(0.02), rngs=rngs,
        kernel_metadata=_meta(*names), bias_metadata=_meta(names[-1]))


class Attention(nnx.Module):
    """Grouped-query attention with optional q/k/v bias (Qwen2) and q/k RMSNorm (Qwen3)."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        d, h, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = h, kv, hd
        self.q_proj = _linear(cfg, d, h * hd, ("embed", "heads"), cfg.attention_bias, rngs)
        self.k_proj = _linear(cfg, d, kv * hd, ("embed", "kv_heads"), cfg.attention_bias, rngs)
        self.v_proj = _linear(cfg, d, kv * hd, ("embed", "kv_heads"), cfg.attention_bias, rngs)
        self.o_proj = _linear(cfg, h * hd, d, ("heads", "embed"), False, rngs)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, param_dtype=cfg.param_dtype, dtype=cfg.dtype)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, param_dtype=cfg.param_dtype, dtype=cfg.dtype)
        else:
            self.q_norm = self.k_norm = None

    def __call__(self, x, cos, sin, mask, cache: LayerCache | None, cache_index):
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            start = (0, cache_index, 0, 0)
            k = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), start)
            v = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), start)
            cache = LayerCache(k, v)
        out = attend(q, k.astype(q.dtype), v.astype(q.dtype), mask)
        return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim)), cache


class MLP(nnx.Module):
    """SwiGLU feed-forward block."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = _linear(cfg, d, f, ("embed", "mlp"), cfg.mlp_bias, rngs)
        self.up_proj = _linear(cfg, d, f, ("embed", "mlp"), cfg.mlp_bias, rngs)
        self.down_proj = _linear(cfg, f, d, ("mlp", "embed"), cfg.mlp_bias, rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        kw = dict(param_dtype=cfg.param_dtype, dtype=cfg.dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.self_attn = Attention(cfg, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, cos, sin, mask, cache, cache_index):
        attn, cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_index)
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, cache


def _run_layer(layer, x, cos, sin, mask, cache, cache_index):
    return layer(x, cos, sin, mask, cache, cache_index)


def _layer_pure(graphdef, state, x, cos, sin, mask, cache, cache_index):
    return nnx.merge(graphdef, state)(x, cos, sin, mask, cache, cache_index)


_layer_checkpointed = jax.checkpoint(_layer_pure, static_argnums=(0,))


def _run_layer_remat(layer, x, cos, sin, mask, cache, cache_index):
    """Per-layer activation checkpointing as a pure function of the layer's state.

    (``nnx.remat`` on the module fails with "Cannot mutate Param from a different trace
    level" when the model was merged inside an outer trace: the micro-batch scan, the
    decode loop, ``eval_shape``.)
    """
    graphdef, state = nnx.split(layer)
    return _layer_checkpointed(graphdef, state, x, cos, sin, mask, cache, cache_index)


class Decoder(nnx.Module):
    """Decoder-only transformer.

    ``model(input_ids [batch, time], attention_mask [batch, time])`` returns float32 logits
    ``[batch, time, vocab]``. With ``cache=`` it also returns the updated cache; see
    :meth:`forward`.
    """

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
            embedding_init=nnx.initializers.normal(0.02), rngs=rngs,
            embedding_metadata=_meta("vocab", "embed"))
        self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps,
                            param_dtype=cfg.param_dtype, dtype=cfg.dtype)
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = _linear(cfg, cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"),
                                   False, rngs)

    # -- pieces, exposed for scoring (vocab-chunked heads) and OAR (gradients w.r.t. embeddings)
    def embed(self, input_ids: jax.Array) -> jax.Array:
        """Input embeddings ``[batch, time, hidden]`` in the compute dtype."""
        return self.embed_tokens(input_ids)

    def output_embedding(self) -> jax.Array:
        """The unembedding matrix ``[hidden, vocab]`` (tied or ``lm_head``)."""
        if self.lm_head is None:
            return self.embed_tokens.embedding[...].T
        return self.lm_head.kernel[...]

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Float32 logits ``[..., vocab]`` from final hidden states ``[..., hidden]``."""
        w = self.output_embedding().astype(self.config.dtype)
        return jnp.dot(hidden.astype(self.config.dtype), w, preferred_element_type=jnp.float32)

    def hidden_states(self, embeddings, kv_mask, *, positions=None, cache=None, cache_index=0):
        """Final normed hidden states ``[batch, time, hidden]`` and the updated cache.

        Args:
          embeddings: ``[batch, time, hidden]`` input embeddings.
          kv_mask: ``[batch, slots]`` validity of key slots: the attention mask of the input
            without a cache, of the whole cache (including the new tokens' slots) with one.
          positions: ``[batch, time]`` RoPE positions; derived from ``kv_mask`` if omitted
            (only without a cache).
          cache: tuple of :class:`LayerCache` or ``None``.
          cache_index: slot where the first input token is written.
        """
        t = embeddings.shape[1]
        if positions is None:
            if cache is not None:
                raise ValueError("positions are required when decoding with a cache")
            positions = positions_from_mask(kv_mask)
        query_slots = jnp.arange(t) + (cache_index if cache is not None else 0)
        mask = attention_mask(kv_mask, query_slots)
        # a trace-time constant, not a parameter: it is fixed by the config
        inv_freq = jnp.asarray(rope_inverse_frequencies(self.config), jnp.float32)
        cos, sin = rotary_tables(positions, inv_freq)
        run = _run_layer_remat if self.config.remat else _run_layer
        x = embeddings
        new_cache = []
        for i, layer in enumerate(self.layers):
            x, layer_cache = run(layer, x, cos, sin, mask,
                                 None if cache is None else cache[i], cache_index)
            new_cache.append(layer_cache)
        return self.norm(x), (tuple(new_cache) if cache is not None else None)

    def forward(self, input_ids, kv_mask, *, positions=None, cache=None, cache_index=0):
        """Logits ``[batch, time, vocab]`` (float32) and the updated cache (or ``None``)."""
        hidden, cache = self.hidden_states(self.embed(input_ids), kv_mask, positions=positions,
                                           cache=cache, cache_index=cache_index)
        return self.logits(hidden), cache

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None):
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        return self.forward(input_ids, attention_mask)[0]
