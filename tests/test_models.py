"""Decoder family: cache consistency, checkpoint round trips, Hugging Face parity, errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from amrsd_jax.models import (CheckpointError, DecoderConfig, init_cache, load_checkpoint,
                              save_checkpoint)
from amrsd_jax.models.decoder import positions_from_mask

from conftest import FAMILIES, tiny_config, tiny_model

PROMPT_MASK = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]], np.int32)


def _random_ids(shape, vocab=96, seed=0):
    return np.random.default_rng(seed).integers(4, vocab, shape).astype(np.int32)


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_decode_matches_full_forward(family):
    """Prefill + one-token decode steps give the full forward's logits at every step."""
    model = tiny_model(**family)
    steps = 5
    ids = _random_ids((3, 6 + steps))
    mask = np.concatenate([PROMPT_MASK, np.ones((3, steps), np.int32)], axis=1)
    full = model(jnp.asarray(ids), jnp.asarray(mask))  # [3, 11, V]

    slots = ids.shape[1] + 2  # spare slots must stay invisible
    cache = init_cache(model.config, 3, slots)
    kv_mask = np.zeros((3, slots), np.int32)
    kv_mask[:, :6] = PROMPT_MASK
    logits, cache = model.forward(jnp.asarray(ids[:, :6]), jnp.asarray(kv_mask),
                                  positions=positions_from_mask(jnp.asarray(PROMPT_MASK)),
                                  cache=cache, cache_index=0)
    # prefill: compare real (unpadded) positions only
    real = PROMPT_MASK.astype(bool)
    np.testing.assert_allclose(np.asarray(logits)[real], np.asarray(full[:, :6])[real],
                               atol=2e-5, rtol=1e-5)
    pos = PROMPT_MASK.sum(1)
    step = jax.jit(lambda tok, kv, p, c, i: model.forward(tok, kv, positions=p, cache=c,
                                                          cache_index=i))
    for s in range(steps):
        slot = 6 + s
        kv_mask[:, slot] = 1
        logits, cache = step(jnp.asarray(ids[:, slot:slot + 1]), jnp.asarray(kv_mask),
                             jnp.asarray(pos[:, None] + s), cache, slot)
        np.testing.assert_allclose(np.asarray(logits[:, 0]), np.asarray(full[:, slot]),
                                   atol=2e-5, rtol=1e-5)


def test_left_padding_does_not_change_real_tokens():
    model = tiny_model()
    ids = _random_ids((1, 4))
    plain = model(jnp.asarray(ids), jnp.ones((1, 4), jnp.int32))
    padded_ids = np.concatenate([np.zeros((1, 3), np.int32), ids], axis=1)
    padded = model(jnp.asarray(padded_ids), jnp.asarray([[0, 0, 0, 1, 1, 1, 1]]))
    np.testing.assert_allclose(np.asarray(padded[:, 3:]), np.asarray(plain), atol=2e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sharded", [False, True], ids=["single-file", "sharded-index"])
def test_safetensors_round_trip(tmp_path, family, sharded):
    model = tiny_model(**family)
    save_checkpoint(model, tmp_path, max_shard_size=30_000 if sharded else None)
    files = {p.name for p in tmp_path.iterdir()}
    if sharded:
        assert "model.safetensors.index.json" in files
        assert sum(f.startswith("model-0000") for f in files) >= 2
    else:
        assert "model.safetensors" in files
    loaded = load_checkpoint(tmp_path)
    assert loaded.config == model.config
    a, b = nnx.state(model, nnx.Param), nnx.state(loaded, nnx.Param)
    for (pa, va), (pb, vb) in zip(nnx.to_flat_state(a), nnx.to_flat_state(b)):
        assert pa == pb
        np.testing.assert_array_equal(np.asarray(va[...]), np.asarray(vb[...]))


def test_bf16_storage_and_compute(tmp_path):
    model = tiny_model()
    save_checkpoint(model, tmp_path)
    ids = jnp.asarray(_random_ids((2, 6)))
    ref = model(ids)
    bf16 = load_checkpoint(tmp_path, dtype="bf16")
    assert bf16.embed_tokens.embedding[...].dtype == jnp.bfloat16
    out = bf16(ids)
    assert out.dtype == jnp.float32  # logits always float32
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=0.05)


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scan", "loop"])
def test_remat_policies_change_nothing_numerically(scan_layers):
    ids = jnp.asarray(_random_ids((2, 6)))

    def loss(m):
        return jnp.mean(jax.nn.log_softmax(m(ids))[..., 5])

    ref = nnx.grad(loss)(tiny_model(scan_layers=scan_layers))
    for policy in ("full", "save_dots", "dots_saveable"):
        grads = nnx.grad(loss)(tiny_model(scan_layers=scan_layers, remat_policy=policy))
        for (_, a), (_, b) in zip(nnx.to_flat_state(ref), nnx.to_flat_state(grads)):
            np.testing.assert_allclose(np.asarray(a[...]), np.asarray(b[...]), atol=1e-6)


def test_remat_policy_is_applied_and_validated():
    """Each policy really puts a checkpoint (with that policy) around the layer."""
    ids = jnp.ones((1, 4), jnp.int32)
    for policy, expect in (("none", False), ("full", True), ("save_dots", True)):
        model = tiny_model(remat_policy=policy)
        jaxpr = str(jax.make_jaxpr(lambda s: nnx.merge(nnx.graphdef(model), s)(ids))(
            nnx.state(model)))
        assert ("checkpoint" in jaxpr or "remat" in jaxpr) == expect, policy
    with pytest.raises(ValueError, match="unknown remat policy 'sometimes'"):
        tiny_config(remat_policy="sometimes")


def test_config_from_hf_dict_reads_families_and_rope():
    base = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2)
    q2 = DecoderConfig.from_hf(dict(base, model_type="qwen2"))
    assert q2.attention_bias and not q2.qk_norm and q2.head_dim == 8
    q3 = DecoderConfig.from_hf(dict(base, model_type="qwen3", head_dim=16))
    assert q3.qk_norm and q3.head_dim == 16
    ll = DecoderConfig.from_hf(dict(base, model_type="llama", rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}))
    assert ll.rope_theta == 500000.0 and ll.rope_scaling_dict["rope_type"] == "llama3"
    with pytest.raises(ValueError, match="unsupported architecture"):
        DecoderConfig.from_hf(dict(base, model_type="gpt2"))
    with pytest.raises(ValueError, match="RoPE scaling"):
        DecoderConfig.from_hf(dict(base, model_type="llama", rope_scaling={"rope_type": "yarn",
                                                                           "factor": 4.0}))


def test_llama3_rope_frequencies_match_reference_formula():
    from amrsd_jax.models.config import rope_inverse_frequencies

    cfg = tiny_config(head_dim=64, rope_theta=500000.0, rope_scaling=(
        ("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
        ("original_max_position_embeddings", 8192), ("rope_type", "llama3")))
    got = rope_inverse_frequencies(cfg)
    base = 1.0 / 500000.0 ** (np.arange(0, 64, 2) / 64)
    wavelen = 2 * np.pi / base
    # high-frequency components untouched, low-frequency ones divided by the factor
    np.testing.assert_allclose(got[wavelen < 8192 / 4], base[wavelen < 8192 / 4])
    np.testing.assert_allclose(got[wavelen > 8192], base[wavelen > 8192] / 8.0)
    mid = (wavelen >= 8192 / 4) & (wavelen <= 8192)
    assert mid.any() and np.all(got[mid] <= base[mid]) and np.all(got[mid] >= base[mid] / 8)


# ------------------------------------------------------------------ errors on bad checkpoints
def test_missing_weights_file(tmp_path):
    save_checkpoint(tiny_model(), tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        load_checkpoint(tmp_path)


def test_truncated_weights_file(tmp_path):
    save_checkpoint(tiny_model(), tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path)


def test_missing_shard_listed_in_index(tmp_path):
    save_checkpoint(tiny_model(), tmp_path, max_shard_size=30_000)
    next(tmp_path.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="is missing"):
        load_checkpoint(tmp_path)


def test_config_weights_shape_mismatch(tmp_path):
    save_checkpoint(tiny_model(), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 48
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_checkpoint(tmp_path)


def test_unsupported_architecture(tmp_path):
    save_checkpoint(tiny_model(), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "mistral", ["MistralForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported architecture"):
        load_checkpoint(tmp_path)


def test_not_a_checkpoint_dir(tmp_path):
    from amrsd_jax.models import load_model

    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="neither a bundled model"):
        load_model(tmp_path / "nope")


# ------------------------------------------------------------------ parity with transformers
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_pytorch(tmp_path, family):
    """Our forward equals the Hugging Face PyTorch reference on the same random weights."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = tiny_model(**family)
    save_checkpoint(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
    hf.eval()
    ids = _random_ids((2, 40))  # long enough for llama3's scaled band (original len 16)
    with torch.no_grad():
        ref = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    ours = np.asarray(model(jnp.asarray(ids)))
    np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=1e-4)
