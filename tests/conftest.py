"""Shared test set-up: 8 fake CPU devices and tiny random models (no downloads)."""

import os

# must precede the first `import jax` anywhere in the test session
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402


def tiny_config(model_type="llama", **overrides):
    from amrsd_jax.models import DecoderConfig

    base = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=8, model_type=model_type, eos_token_id=3,
                pad_token_id=0, bos_token_id=1, max_position_embeddings=256)
    base.update(overrides)
    return DecoderConfig(**base)


def tiny_model(model_type="llama", seed=0, **overrides):
    from flax import nnx

    from amrsd_jax.models import Decoder

    return Decoder(tiny_config(model_type, **overrides), rngs=nnx.Rngs(seed))


FAMILIES = [
    pytest.param(dict(model_type="llama"), id="llama"),
    pytest.param(dict(model_type="llama", tie_word_embeddings=True,
                      rope_scaling=(("factor", 8.0), ("high_freq_factor", 4.0),
                                    ("low_freq_factor", 1.0),
                                    ("original_max_position_embeddings", 16),
                                    ("rope_type", "llama3"))), id="llama3-tied"),
    pytest.param(dict(model_type="qwen2"), id="qwen2"),
    pytest.param(dict(model_type="qwen3", tie_word_embeddings=True), id="qwen3"),
]
