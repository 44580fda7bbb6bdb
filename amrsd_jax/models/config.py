"""Decoder configuration: one dataclass for the Llama / Qwen2 / Qwen3 decoder family.

Built from a Hugging Face ``config.json`` through ``transformers.AutoConfig`` so that
every field name and default follows the upstream definition.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax
import numpy as np

# model_type -> (q/k/v projection bias, per-head q/k RMSNorm)
SUPPORTED_FAMILIES: dict[str, tuple[bool, bool]] = {
    "llama": (False, False),
    "qwen2": (True, False),
    "qwen3": (False, True),
}

DTYPES = {"float32": np.float32, "fp32": np.float32, "bfloat16": "bfloat16", "bf16": "bfloat16"}


# model.remat_policy -> what each layer keeps for the backward pass (None: no remat)
REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole layer
    # keep the weight matmuls' outputs, recompute attention scores and elementwise ops
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    **{name: getattr(jax.checkpoint_policies, name) for name in (
        "nothing_saveable", "everything_saveable", "dots_saveable",
        "dots_with_no_batch_dims_saveable", "checkpoint_dots",
        "checkpoint_dots_with_no_batch_dims")},
}


def check_remat_policy(name: str) -> str:
    """``name`` if it is a known remat policy, else a ``ValueError`` listing them."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {name!r}; use one of {sorted(REMAT_POLICIES)} "
                         "(none, full, save_dots, or a jax.checkpoint_policies name)")
    return name


def canonical_dtype(name: str) -> str:
    """Map user spellings (``fp32``, ``bf16``, ...) to ``float32`` / ``bfloat16``."""
    key = str(name).lower().replace("jnp.", "").replace("torch.", "")
    if key in ("float32", "fp32", "f32"):
        return "float32"
    if key in ("bfloat16", "bf16"):
        return "bfloat16"
    raise ValueError(f"unsupported dtype {name!r}: use 'float32' (fp32) or 'bfloat16' (bf16)")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Architecture and numerics of a decoder-only transformer.

    ``param_dtype`` is the storage dtype of the weights, ``dtype`` the compute dtype of
    activations; logits are always returned in float32. ``scan_layers`` stacks the layers'
    parameters on a leading ``layers`` axis and runs them with one ``lax.scan`` (a program
    whose size does not depend on depth; ``False``: a Python loop, for debugging);
    ``remat_policy`` is what each layer keeps for the backward pass (:data:`REMAT_POLICIES`).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    model_type: str = "llama"
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # sorted items of the HF dict
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2)
    qk_norm: bool = False  # RMSNorm over head_dim on q and k before RoPE (Qwen3)
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat_policy: str = "none"
    scan_layers: bool = True

    def __post_init__(self):
        if self.model_type not in SUPPORTED_FAMILIES:
            raise ValueError(
                f"unsupported architecture model_type={self.model_type!r}; supported: "
                f"{sorted(SUPPORTED_FAMILIES)} (Llama 3.x / SmolLM, Qwen2 / Qwen2.5, Qwen3)"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        # the family fixes these: Qwen2 always has q/k/v bias, Qwen3 always has q/k norm
        family_bias, family_qk_norm = SUPPORTED_FAMILIES[self.model_type]
        if family_bias:
            object.__setattr__(self, "attention_bias", True)
        if family_qk_norm:
            object.__setattr__(self, "qk_norm", True)
        object.__setattr__(self, "param_dtype", canonical_dtype(self.param_dtype))
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype))
        check_remat_policy(self.remat_policy)

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    def replace(self, **changes) -> "DecoderConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Parameter count (tied embeddings counted once)."""
        d, f, h, kv, hd = (self.hidden_size, self.intermediate_size, self.num_heads,
                           self.num_kv_heads, self.head_dim)
        attn = d * h * hd * 2 + d * kv * hd * 2
        if self.attention_bias:
            attn += h * hd + 2 * kv * hd
        if self.qk_norm:
            attn += 2 * hd
        layer = attn + 3 * d * f + 2 * d
        emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + emb + d

    # ------------------------------------------------------------------ HF interop
    @classmethod
    def from_hf(cls, hf_config: Any, *, dtype: str = "float32", param_dtype: str | None = None,
                remat_policy: str = "none", scan_layers: bool = True) -> "DecoderConfig":
        """Build from a ``transformers`` ``PretrainedConfig`` (or a plain dict of its fields)."""
        get = (hf_config.get if isinstance(hf_config, dict)
               else lambda k, d=None: getattr(hf_config, k, d))
        model_type = get("model_type")
        if model_type not in SUPPORTED_FAMILIES:
            arch = get("architectures")
            raise ValueError(
                f"unsupported architecture: model_type={model_type!r} architectures={arch}; "
                f"amrsd_jax supports {sorted(SUPPORTED_FAMILIES)}"
            )
        qkv_bias, qk_norm = SUPPORTED_FAMILIES[model_type]
        if model_type == "llama":
            qkv_bias = bool(get("attention_bias", False))
        if model_type == "qwen3" and get("attention_bias", False):
            qkv_bias = True
        if get("use_sliding_window", False):
            raise ValueError("sliding-window attention (use_sliding_window=True) is not supported")
        num_heads = int(get("num_attention_heads"))
        hidden = int(get("hidden_size"))
        head_dim = get("head_dim") or hidden // num_heads
        # transformers v5 keeps RoPE settings in `rope_parameters`; v4 in rope_theta/rope_scaling.
        rope_params = dict(get("rope_parameters") or {})
        rope_scaling = dict(get("rope_scaling") or {}) or {
            k: v for k, v in rope_params.items() if k != "rope_theta"}
        rope_theta = float(rope_params.get("rope_theta", get("rope_theta", 10000.0)) or 10000.0)
        rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
        if rope_type not in ("default", "linear", "llama3"):
            raise ValueError(f"unsupported RoPE scaling type {rope_type!r} (default, linear, llama3)")
        rope_items = None
        if rope_type != "default":
            rope_scaling["rope_type"] = rope_type
            rope_scaling.pop("type", None)
            rope_items = tuple(sorted((k, v) for k, v in rope_scaling.items()
                                      if isinstance(v, (int, float, str)) and k != "rope_theta"))
        eos = get("eos_token_id")
        if isinstance(eos, list):
            eos = tuple(eos)
        return cls(
            vocab_size=int(get("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(get("intermediate_size")),
            num_layers=int(get("num_hidden_layers")),
            num_heads=num_heads,
            num_kv_heads=int(get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            model_type=model_type,
            rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_items,
            max_position_embeddings=int(get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            attention_bias=qkv_bias,
            qk_norm=qk_norm,
            mlp_bias=bool(get("mlp_bias", False)),
            bos_token_id=get("bos_token_id"),
            eos_token_id=eos,
            pad_token_id=get("pad_token_id"),
            param_dtype=param_dtype or dtype,
            dtype=dtype,
            remat_policy=remat_policy,
            scan_layers=scan_layers,
        )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> "DecoderConfig":
        """Read ``config.json`` of a local checkpoint directory through ``AutoConfig``."""
        from transformers import AutoConfig

        hf = AutoConfig.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)
        return cls.from_hf(hf, **kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        """A ``config.json`` dict in Hugging Face layout for this architecture."""
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM"}[self.model_type]
        out: dict[str, Any] = {
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "torch_dtype": self.param_dtype,
        }
        if self.rope_scaling:
            out["rope_scaling"] = dict(self.rope_scaling)
        if self.model_type in ("llama", "qwen3"):
            out["attention_bias"] = self.attention_bias
        if self.model_type == "llama":
            out["mlp_bias"] = self.mlp_bias
        for k in ("bos_token_id", "pad_token_id"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        if self.eos_token_id is not None:
            out["eos_token_id"] = (list(self.eos_token_id) if isinstance(self.eos_token_id, tuple)
                                   else self.eos_token_id)
        return out


def rope_inverse_frequencies(cfg: DecoderConfig) -> np.ndarray:
    """RoPE inverse frequencies ``[head_dim // 2]`` (float64 numpy, computed once on host).

    Implements the ``default``, ``linear`` and ``llama3`` schemes of Hugging Face.
    """
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    scaling = cfg.rope_scaling_dict
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type")
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    # llama3: long wavelengths are divided by `factor`, short ones kept, the band between
    # interpolated smoothly (Llama 3.1 long-context recipe).
    factor = float(scaling["factor"])
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_len = float(scaling.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return np.where(medium, smoothed, scaled)
