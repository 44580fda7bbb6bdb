"""Sharded forward and sampling on 8 fake CPU devices equal the single-device results."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from amrsd_jax import hlo
from amrsd_jax.models import load_checkpoint, save_checkpoint
from amrsd_jax.rollout import SamplingConfig, continue_generation, generate
from amrsd_jax.rollout.sampler import lower_generate
from amrsd_jax.sharding import make_mesh, shard_batch, shard_model, state_shardings
from amrsd_jax.train.aot import tpu_topology_devices

from conftest import tiny_model

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")

MESHES = [pytest.param((2, 2, 2), id="data2-fsdp2-tensor2"), pytest.param((8, 1, 1), id="data8"),
          pytest.param((1, 8, 1), id="fsdp8")]
IDS = np.random.default_rng(7).integers(4, 96, (8, 10)).astype(np.int32)
MASK = np.ones_like(IDS)
MASK[::2, :3] = 0


@pytest.mark.parametrize("shape", MESHES)
def test_sharded_forward_equals_single_device(shape):
    ref = np.asarray(tiny_model(seed=1)(jnp.asarray(IDS), jnp.asarray(MASK)))
    mesh = make_mesh(*shape)
    model = shard_model(tiny_model(seed=1), mesh)
    ids, mask = shard_batch((IDS, MASK), mesh)
    out = jax.jit(lambda g, s, i, m: nnx.merge(g, s)(i, m))(*nnx.split(model), ids, mask)
    np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", MESHES)
def test_sharded_sampling_equals_single_device(shape):
    cfg = SamplingConfig(max_new_tokens=8, temperature=1.0)
    ref = generate(tiny_model(seed=1), IDS, MASK, jax.random.key(3), cfg, stop_tokens=[5])
    mesh = make_mesh(*shape)
    model = shard_model(tiny_model(seed=1), mesh)
    out = generate(model, IDS, MASK, jax.random.key(3), cfg, stop_tokens=[5], mesh=mesh)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    np.testing.assert_array_equal(np.asarray(out.mask), np.asarray(ref.mask))
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(ref.logprobs), atol=2e-5)


@pytest.mark.parametrize("shape", MESHES)
def test_sharded_continuation_equals_single_device(shape):
    """A follow-up turn on the rollouts' sharded KV cache, for a gathered subset of rows."""
    cfg = SamplingConfig(max_new_tokens=6, temperature=1.0)
    rows = np.array([7, 0, 0, 3, 5, 2, 2, 6])
    suffix = np.random.default_rng(8).integers(4, 96, (8, 4)).astype(np.int32)
    suffix_mask = np.ones_like(suffix)
    suffix_mask[1::3, :2] = 0

    def run(model, mesh):
        _, state = generate(model, IDS, MASK, jax.random.key(3), cfg, stop_tokens=[5],
                            mesh=mesh, return_state=True)
        return continue_generation(model, state, rows, suffix, suffix_mask, jax.random.key(4),
                                   cfg, stop_tokens=[5], mesh=mesh)

    ref = run(tiny_model(seed=1), None)
    mesh = make_mesh(*shape)
    out = run(shard_model(tiny_model(seed=1), mesh), mesh)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(ref.logprobs), atol=2e-5)


def test_parameters_really_are_sharded(tmp_path):
    """fsdp x tensor split the weights; each device holds ~1/(fsdp*tensor) of a kernel (the
    stacked layers' leading layer axis is not split: every device runs every layer)."""
    save_checkpoint(tiny_model(), tmp_path)
    mesh = make_mesh(2, 2, 2)
    model = load_checkpoint(tmp_path, mesh=mesh)  # created directly in its sharding
    q = model.layers.self_attn.q_proj.kernel[...]
    assert q.shape[0] == model.config.num_layers
    assert q.sharding.spec == P(None, "fsdp", "tensor")
    emb = model.embed_tokens.embedding[...]
    assert emb.sharding.spec == P("tensor", "fsdp")
    down = model.layers.mlp.down_proj.kernel[...]
    assert down.sharding.spec == P(None, "tensor", "fsdp")
    for arr in (q, emb, down):
        per_device = {s.device: s.data.nbytes for s in arr.addressable_shards}
        assert len(per_device) == 8
        assert max(per_device.values()) == arr.nbytes // 4
    norm = model.norm.weight[...]
    assert norm.sharding.spec == P(None) or norm.sharding.is_fully_replicated


def test_indivisible_dimensions_fall_back_to_replication():
    # 9 heads x 8 = 72 divides by 2; 3 kv heads x 8 = 24 too; vocab 95 does not
    model = tiny_model(vocab_size=95)
    mesh = make_mesh(1, 1, 8)
    shard_model(model, mesh)
    emb = model.embed_tokens.embedding[...]
    assert emb.sharding.spec[0] is None  # vocab 95 not divisible by tensor=8


def test_mesh_shape_must_match_devices():
    with pytest.raises(ValueError, match="devices"):
        make_mesh(3, 1, 1)


def _decode_loop(mesh, reshard_weights, **model):
    """Collectives per decoded token of the sampler compiled for ``mesh`` (abstract weights,
    so the mesh may be a compile-only TPU topology)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: tiny_model(seed=1, **model)))
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         state, state_shardings(state, mesh))
    lowered = lower_generate(graphdef, state, 16, 10, SamplingConfig(max_new_tokens=8),
                             num_stop_ids=1, mesh=mesh, reshard_weights=reshard_weights)
    return hlo.decode_loop_collectives(lowered.compile().as_text())


@pytest.mark.parametrize("shape", [(1, 8, 1), (2, 4, 1)], ids=["fsdp8", "data2-fsdp4"])
def test_rollout_layout_has_no_weight_collectives_per_token(shape):
    """In the rollout layout the weights are gathered once per sampling call: the token
    loop moves only the rows' stop flags (one all-reduce of a predicate), while in the
    training (fsdp) layout every layer's weights are gathered again for every token."""
    mesh = make_mesh(*shape)
    rollout, training = _decode_loop(mesh, True), _decode_loop(mesh, False)
    assert rollout["loops"] == training["loops"] == 1
    assert rollout["collectives"] <= 1 and rollout["bytes"] <= 8, rollout
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(tiny_model(seed=1))))
    assert training["bytes"] > weight_bytes / 2, (training, weight_bytes)  # the old layout


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="needs libtpu (pip install 'amrsd_jax[tpu-aot]')")
def test_rollout_layout_on_the_tpu_compiler():
    """The TPU compiler keeps the rollout layout's token loop free of weight collectives
    too (an untied lm_head, bf16 compute; its text has no trip counts, so a nested layer
    scan counts once: the training layout's number is a lower bound)."""
    mesh = make_mesh(1, 8, 1, devices=tpu_topology_devices("v5e", 8))
    model = dict(num_layers=4, vocab_size=2048, hidden_size=256, intermediate_size=512,
                 num_heads=8, num_kv_heads=4, head_dim=32, dtype="bfloat16")
    rollout, training = _decode_loop(mesh, True, **model), _decode_loop(mesh, False, **model)
    assert rollout["loops"] == training["loops"] == 1
    assert rollout["collectives"] <= 1 and rollout["bytes"] <= 8, rollout
    assert training["bytes"] > 2**20, training  # at least one layer's weights per token
