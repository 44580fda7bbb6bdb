"""Flax NNX decoder for the Llama / SmolLM / Qwen2 / Qwen3 family.

Module and attribute names mirror Hugging Face (``embed_tokens``, ``layers[i].self_attn.q_proj``
...) so that checkpoint conversion is a rename plus a transpose. Every parameter carries
logical sharding names (``vocab``, ``embed``, ``heads``, ``kv_heads``, ``mlp``, ``norm``) that
one rule table in :mod:`amrsd_jax.sharding` maps onto the mesh axes ``data``/``fsdp``/``tensor``.

Layers (``scan_layers=True``, the default) are ONE :class:`DecoderLayer` whose parameters
carry a leading layer axis (created with ``nnx.vmap``; logical name ``layers``), run by one
``jax.lax.scan``: the program has one layer body whatever the depth. Parameter paths are
``('layers', 'self_attn', 'q_proj', 'kernel')`` with shape ``[layers, in, out]`` (the
checkpoint mapping in :mod:`amrsd_jax.models.checkpoint` adds the layer index back);
``scan_layers=False`` keeps a Python list ``('layers', i, ...)`` for debugging. Activations
are pinned to logical axes (:func:`amrsd_jax.sharding.constrain`) at layer boundaries, q/k/v,
the MLP hidden, the logits and the KV cache.

The KV cache is a plain pytree passed in and returned (no hidden module state), so the
same module serves training (no cache) and jitted sampling (static-shape cache). It is
stacked like the parameters: ``[layers, batch, slots, kv_heads, head_dim]``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ..sharding import constrain, token_names
from .config import REMAT_POLICIES, DecoderConfig, rope_inverse_frequencies

# logical axes of the activations
HIDDEN = ("batch", "sequence", "activation_embed")
CACHE = ("layers", "batch", "sequence", "kv_heads", "head_dim")


def _meta(*names):
    # eager_sharding=False: create unsharded; placement happens once, from the rule table.
    return {"out_sharding": names, "eager_sharding": False}


class KVCache(NamedTuple):
    """Keys and values of every layer: ``[layers, batch, slots, kv_heads, head_dim]`` each
    (one layer's ``[batch, slots, kv_heads, head_dim]`` inside the layer scan)."""

    k: jax.Array
    v: jax.Array


def init_cache(cfg: DecoderConfig, batch: int, slots: int, dtype=None) -> KVCache:
    """Zero KV cache with ``slots`` positions for every layer."""
    dtype = dtype or cfg.dtype
    shape = (cfg.num_layers, batch, slots, cfg.num_kv_heads, cfg.head_dim)
    return KVCache(constrain(jnp.zeros(shape, dtype), CACHE),
                   constrain(jnp.zeros(shape, dtype), CACHE))


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

    def __call__(self, x, cos, sin, mask, cache: KVCache | None, cache_index):
        b, t, _ = x.shape
        q_names = ("batch", "sequence", "heads", "head_dim")
        kv_names = ("batch", "sequence", "kv_heads", "head_dim")
        q = constrain(self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim), q_names)
        k = constrain(self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim), kv_names)
        v = constrain(self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim), kv_names)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            start = (0, cache_index, 0, 0)
            k = constrain(jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), start),
                          kv_names)
            v = constrain(jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), start),
                          kv_names)
            cache = KVCache(k, v)
        out = attend(q, k.astype(q.dtype), v.astype(q.dtype), mask)
        out = constrain(out.reshape(b, t, self.num_heads * self.head_dim),
                        ("batch", "sequence", "heads"))
        return self.o_proj(out), cache


class MLP(nnx.Module):
    """SwiGLU feed-forward block."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = _linear(cfg, d, f, ("embed", "mlp"), cfg.mlp_bias, rngs)
        self.up_proj = _linear(cfg, d, f, ("embed", "mlp"), cfg.mlp_bias, rngs)
        self.down_proj = _linear(cfg, f, d, ("mlp", "embed"), cfg.mlp_bias, rngs)

    def __call__(self, x):
        hidden = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(constrain(hidden, ("batch", "sequence", "mlp")))


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


def _layer_step(graphdef, x, state, cache, cos, sin, mask, cache_index):
    """One layer as a pure function of its state: ``(x, cache) -> (x, cache)``.

    (Pure so that it can be scanned and checkpointed; ``nnx.remat`` on the module fails with
    "Cannot mutate Param from a different trace level" when the model was merged inside an
    outer trace: the micro-batch scan, the decode loop, ``eval_shape``.)
    """
    x = constrain(x, HIDDEN)
    x, cache = nnx.merge(graphdef, state)(x, cos, sin, mask, cache, cache_index)
    return constrain(x, HIDDEN), cache


def layer_function(graphdef, remat_policy: str, *, scanned: bool):
    """:func:`_layer_step` for layers of ``graphdef``, checkpointed under ``remat_policy``."""
    step = functools.partial(_layer_step, graphdef)
    policy = REMAT_POLICIES[remat_policy]
    if remat_policy == "none":
        return step
    # a scan body is never CSE'd with the forward pass, so inside one the CSE barrier
    # (which also blocks useful optimisations) is not needed
    return jax.checkpoint(step, policy=policy, prevent_cse=not scanned)


def stacked_layers(cfg: DecoderConfig, rngs: nnx.Rngs) -> "DecoderLayer":
    """``cfg.num_layers`` layers as one module whose parameters are stacked on a leading
    ``layers`` axis (each layer initialised from its own split of ``rngs``)."""

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs):
        return DecoderLayer(cfg, rngs=rngs)

    return make(rngs)


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
        if cfg.scan_layers:
            self.layers = stacked_layers(cfg, rngs)
        else:
            self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs)
                                    for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps,
                            param_dtype=cfg.param_dtype, dtype=cfg.dtype)
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = _linear(cfg, cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"),
                                   False, rngs)

    # -- pieces, exposed for scoring (vocab-chunked heads) and OAR (gradients w.r.t. embeddings)
    def embed(self, input_ids: jax.Array) -> jax.Array:
        """Input embeddings ``[batch, time, hidden]`` in the compute dtype (looked up in the
        ``lookup_batch`` layout, see :data:`amrsd_jax.sharding.DEFAULT_RULES`)."""
        ids = constrain(input_ids, token_names(input_ids.ndim, "lookup_batch"))
        return constrain(self.embed_tokens(ids), token_names(ids.ndim + 1, "lookup_batch", "embed"))

    def output_embedding(self) -> jax.Array:
        """The unembedding matrix ``[hidden, vocab]`` (tied or ``lm_head``)."""
        if self.lm_head is None:
            return self.embed_tokens.embedding[...].T
        return self.lm_head.kernel[...]

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Float32 logits ``[..., vocab]`` from final hidden states ``[..., hidden]``."""
        w = self.output_embedding().astype(self.config.dtype)
        logits = jnp.dot(hidden.astype(self.config.dtype), w, preferred_element_type=jnp.float32)
        if logits.ndim < 2:
            return logits
        return constrain(logits, token_names(logits.ndim, "batch", "vocab"))

    def hidden_states(self, embeddings, kv_mask, *, positions=None, cache=None, cache_index=0):
        """Final normed hidden states ``[batch, time, hidden]`` and the updated cache.

        Args:
          embeddings: ``[batch, time, hidden]`` input embeddings.
          kv_mask: ``[batch, slots]`` validity of key slots: the attention mask of the input
            without a cache, of the whole cache (including the new tokens' slots) with one.
          positions: ``[batch, time]`` RoPE positions; derived from ``kv_mask`` if omitted
            (only without a cache).
          cache: the stacked :class:`KVCache` or ``None``.
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
        context = (cos, sin, mask, cache_index)
        cfg = self.config
        if cfg.scan_layers:
            graphdef, state = nnx.split(self.layers)
            step = layer_function(graphdef, cfg.remat_policy, scanned=True)

            def body(x, layer):
                return step(x, *layer, *context)

            x, cache = jax.lax.scan(body, embeddings, (state, cache))
        else:
            x, new_cache = embeddings, []
            for i, layer in enumerate(self.layers):
                graphdef, state = nnx.split(layer)
                step = layer_function(graphdef, cfg.remat_policy, scanned=False)
                layer_cache = None if cache is None else jax.tree.map(lambda c: c[i], cache)
                x, layer_cache = step(x, state, layer_cache, *context)
                new_cache.append(layer_cache)
            if cache is not None:
                cache = jax.tree.map(lambda *c: jnp.stack(c), *new_cache)
        if cache is not None:
            cache = KVCache(constrain(cache.k, CACHE), constrain(cache.v, CACHE))
        return self.norm(x), cache

    def forward(self, input_ids, kv_mask, *, positions=None, cache=None, cache_index=0):
        """Logits ``[batch, time, vocab]`` (float32) and the updated cache (or ``None``)."""
        hidden, cache = self.hidden_states(self.embed(input_ids), kv_mask, positions=positions,
                                           cache=cache, cache_index=cache_index)
        return self.logits(hidden), cache

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None):
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        return self.forward(input_ids, attention_mask)[0]
