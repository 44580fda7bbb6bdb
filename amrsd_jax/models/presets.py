"""Architectures of known checkpoints (their Hugging Face ``config.json``, no weights).

They let the AOT memory check (``python run.py train --dry-run``) build the exact model
graph of a run on a machine that has no checkpoint: :func:`architecture_config` reads a local
checkpoint directory's ``config.json`` when there is one and falls back to these presets.

Every value is copied from the model's public ``config.json`` (the source is cited above
each dict); fields the decoder does not use (``initializer_range``, ``sliding_window`` with
``use_sliding_window: false``, ``torch_dtype`` ...) are left out.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .config import DecoderConfig

# Qwen/Qwen2.5-Math-1.5B, https://huggingface.co/Qwen/Qwen2.5-Math-1.5B/blob/main/config.json
# as mirrored verbatim in https://huggingface.co/unsloth/Qwen2.5-Math-1.5B/blob/main/config.json
# ("_name_or_path": "Qwen/Qwen2.5-Math-1.5B"); the shape numbers agree with litgpt's
# litgpt/config.py entry "Qwen2.5-Math-1.5B" (block_size 4096, n_layer 28, n_head 12,
# n_embd 1536, n_query_groups 2, intermediate_size 8960, norm_eps 1e-6, rope_base 10000).
_QWEN25_MATH_15B = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "vocab_size": 151936,
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    # no "head_dim" key upstream: hidden_size / num_attention_heads = 128
    "max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-06,
    "tie_word_embeddings": True,
    "use_sliding_window": False,
    "bos_token_id": 151643,
    "eos_token_id": 151643,  # <|endoftext|> (base model)
}

# Qwen/Qwen2.5-Math-1.5B-Instruct: the same architecture; its config.json differs only in
# eos_token_id 151645 (<|im_end|>), as in the instruct-derived config at
# https://huggingface.co/Geralt-Targaryen/QwQ-Math-1.5B-Persona/blob/main/config.json
# ("_name_or_path": "../models/qwen2.5-math-1.5b-instruct": hidden 1536, 28 layers, 12/2 heads,
# max_position_embeddings 4096, rope_theta 10000.0, tie_word_embeddings true).
_QWEN25_MATH_15B_INSTRUCT = dict(_QWEN25_MATH_15B, eos_token_id=151645)

# Qwen/Qwen3-8B, https://huggingface.co/Qwen/Qwen3-8B/blob/main/config.json, as copied in
# github.com/sanjithudupa/compute-aware-arch-search Qwen3-8B/config.json (transformers 4.57.1)
# and in litgpt/config.py "Qwen3-8B" (n_layer 36, n_head 32, n_embd 4096, n_query_groups 8,
# intermediate_size 12288, rope_base 1000000, norm_qk True).
_QWEN3_8B = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "vocab_size": 151936,
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 40960,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-06,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "use_sliding_window": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}

# HuggingFaceTB/SmolLM2-135M-Instruct (the bundled offline model): the config.json that
# amrsd_jax.models.gguf_import writes from the bundled GGUF (~/.cache/amrsd_jax/
# smollm2-135m-instruct/config.json), which matches litgpt/config.py "SmolLM2-135M"
# (n_layer 30, n_head 9, n_embd 576, n_query_groups 3, intermediate_size 1536,
# rope_base 100000, norm_eps 1e-5, block_size 8192) and the upstream Instruct config.json
# (bos 1 = <|im_start|>, eos 2 = <|im_end|>, tied embeddings).
_SMOLLM2_135M_INSTRUCT = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "max_position_embeddings": 8192,
    "rope_theta": 100000.0,
    "rms_norm_eps": 1e-05,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
}

PRESETS: dict[str, dict[str, Any]] = {
    "qwen2.5-math-1.5b": _QWEN25_MATH_15B,
    "qwen2.5-math-1.5b-instruct": _QWEN25_MATH_15B_INSTRUCT,
    "qwen3-8b": _QWEN3_8B,
    "smollm2-135m-instruct": _SMOLLM2_135M_INSTRUCT,
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def hf_config(name: str) -> dict[str, Any]:
    """A copy of preset ``name``'s ``config.json`` dict (case-insensitive name)."""
    key = str(name).lower()
    if key not in PRESETS:
        raise KeyError(f"no architecture preset {name!r}; presets: {', '.join(preset_names())}")
    return dict(PRESETS[key])


def match_preset(name_or_path: str | os.PathLike) -> str | None:
    """The preset whose name is contained in the path's last component (case-insensitive;
    the longest wins), e.g. ``/ckpt/Qwen2.5-Math-1.5B-Instruct`` ->
    ``"qwen2.5-math-1.5b-instruct"``, ``Qwen/Qwen3-8B-Base`` -> ``"qwen3-8b"``; else ``None``."""
    base = Path(str(name_or_path).rstrip("/\\")).name.lower()
    hits = [p for p in PRESETS if p in base]
    return max(hits, key=len) if hits else None


def architecture_config(name_or_path: str | os.PathLike, *, dtype: str = "float32",
                        param_dtype: str | None = None, remat_policy: str = "none",
                        scan_layers: bool = True) -> DecoderConfig:
    """The :class:`DecoderConfig` of a local checkpoint directory or a preset name.

    A directory with a ``config.json`` wins (read exactly as the checkpoint loader reads it);
    otherwise ``name_or_path`` must be a preset name (case-insensitive). Anything else is an
    error that lists the presets. No weights are read.
    """
    path = Path(str(name_or_path)).expanduser()
    if (path / "config.json").is_file():
        return DecoderConfig.from_pretrained(path, dtype=dtype, param_dtype=param_dtype,
                                             remat_policy=remat_policy, scan_layers=scan_layers)
    key = str(name_or_path).lower()
    if key in PRESETS:
        return DecoderConfig.from_hf(PRESETS[key], dtype=dtype, param_dtype=param_dtype,
                                     remat_policy=remat_policy, scan_layers=scan_layers)
    where = ("is a directory without config.json" if path.is_dir()
             else "is not a local checkpoint directory")
    raise ValueError(f"{str(name_or_path)!r} {where} and not an architecture preset; "
                     f"presets: {', '.join(preset_names())}")
