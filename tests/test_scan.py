"""Scanned layers and the update step's layout.

* a scanned model (``scan_layers=True``: stacked parameters, one ``lax.scan``) computes what
  the Python loop computes: logits, gradients, greedy tokens, the KV cache and a continuation
  decoded from it, for every architecture family of the presets;
* the program does not grow with depth;
* micro-batches are strided (spread over every data device), give the contiguous split's
  gradients, and no integer batch array is gathered across devices;
* with libtpu installed, the TPU compiler compiles the scanned update step.
"""

import contextlib
import importlib.util
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from amrsd_jax import update
from amrsd_jax.batch import make_batch
from amrsd_jax.models import (Decoder, DecoderConfig, load_checkpoint, model_state_dict,
                              save_checkpoint)
from amrsd_jax.models.presets import hf_config
from amrsd_jax.rollout import SamplingConfig, continue_generation, generate
from amrsd_jax.sharding import activation_layout, make_mesh, shard_batch
from amrsd_jax.train.aot import tpu_topology_devices
from amrsd_jax.update import (OptimizerConfig, StepConfig, init_train_state, make_optimizer,
                              make_update_step, place_state, split_micro_batches)

from conftest import abstract_train_state, tiny_model

EIGHT = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
# one preset per architecture family (the two Qwen2.5-Math presets share one)
PRESET_FAMILIES = ["qwen2.5-math-1.5b", "qwen3-8b", "smollm2-135m-instruct"]
TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            max_position_embeddings=256, bos_token_id=1, eos_token_id=3, pad_token_id=0)


def preset_pair(name, tmp_path):
    """The preset's architecture shrunk to a tiny size, as a looped model and the scanned
    model loaded from its checkpoint (the same weights)."""
    cfg = DecoderConfig.from_hf(dict(hf_config(name), **TINY), scan_layers=False)
    loop = Decoder(cfg, rngs=nnx.Rngs(0))
    save_checkpoint(loop, tmp_path)
    scan = load_checkpoint(tmp_path, scan_layers=True)
    assert scan.config == cfg.replace(scan_layers=True)
    return loop, scan


def ids_and_mask(rows=3, width=7, seed=0):
    ids = np.random.default_rng(seed).integers(4, 96, (rows, width)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[0, :2] = 0
    mask[2, :4] = 0
    return ids, mask


@pytest.mark.parametrize("name", PRESET_FAMILIES)
def test_scan_equals_loop_logits_and_gradients(name, tmp_path):
    loop, scan = preset_pair(name, tmp_path)
    ids, mask = map(jnp.asarray, ids_and_mask())
    np.testing.assert_allclose(np.asarray(scan(ids, mask)), np.asarray(loop(ids, mask)),
                               atol=2e-5, rtol=1e-5)

    def loss(model):
        return jnp.mean(jax.nn.log_softmax(model(ids, mask))[..., 5] * mask)

    g_loop = dict(nnx.to_flat_state(nnx.grad(loss)(loop)))
    g_scan = dict(nnx.to_flat_state(nnx.grad(loss)(scan)))
    assert len(g_loop) > len(g_scan)  # one stacked array stands for num_layers arrays
    for path, g in g_scan.items():
        if path[0] == "layers":  # [layers, ...]: layer i is the loop's layers[i]
            expected = np.stack([np.asarray(g_loop[(path[0], i) + path[1:]][...])
                                 for i in range(scan.config.num_layers)])
        else:
            expected = np.asarray(g_loop[path][...])
        np.testing.assert_allclose(np.asarray(g[...]), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", PRESET_FAMILIES)
def test_scan_equals_loop_decoding_and_kv_cache(name, tmp_path):
    """Greedy tokens, the stacked KV cache after generation, and a continuation decoded from
    that cache are the same for both layouts."""
    loop, scan = preset_pair(name, tmp_path)
    ids, mask = ids_and_mask()
    cfg = SamplingConfig(max_new_tokens=6, greedy=True)
    suffix = np.random.default_rng(1).integers(4, 96, (2, 3)).astype(np.int32)
    results = []
    for model in (loop, scan):
        out, state = generate(model, ids, mask, jax.random.key(0), cfg, stop_tokens=[3],
                              return_state=True)
        more = continue_generation(model, state, np.array([2, 0]), suffix, np.ones_like(suffix),
                                   jax.random.key(1), cfg, stop_tokens=[3])
        results.append((out, state, more))
    (out_l, state_l, more_l), (out_s, state_s, more_s) = results
    np.testing.assert_array_equal(np.asarray(out_s.tokens), np.asarray(out_l.tokens))
    np.testing.assert_allclose(np.asarray(out_s.logprobs), np.asarray(out_l.logprobs),
                               atol=2e-5)
    layers = scan.config.num_layers
    assert state_s.cache.k.shape[:2] == (layers, ids.shape[0])  # [layers, batch, slots, ...]
    valid = np.asarray(state_s.kv_mask, bool)[None, :, :, None, None]
    for a, b in zip(state_s.cache, state_l.cache):
        np.testing.assert_allclose(np.where(valid, np.asarray(a), 0),
                                   np.where(valid, np.asarray(b), 0), atol=2e-5)
    np.testing.assert_array_equal(np.asarray(more_s.tokens), np.asarray(more_l.tokens))


def test_checkpoint_files_do_not_depend_on_the_layer_layout(tmp_path):
    loop, scan = preset_pair("qwen3-8b", tmp_path)
    a, b = model_state_dict(loop), model_state_dict(scan)
    assert sorted(a) == sorted(b)
    assert "model.layers.2.self_attn.q_norm.weight" in a
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


# ----------------------------------------------------------------------------- program size
def _update_hlo(num_layers, scan_layers, rows=8):
    """HLO text (before XLA's optimisations) of the update step of a tiny model."""
    model = nnx.eval_shape(lambda: tiny_model(num_layers=num_layers, scan_layers=scan_layers))
    optimizer = make_optimizer(OptimizerConfig())
    batch = _batch(rows)
    step, state_sh = make_update_step(model, optimizer, StepConfig(group_size=4), _mesh(1),
                                      batch)
    state = abstract_train_state(model, optimizer, state_sh)
    return step.jitted.lower(state, batch, None, step.other).as_text(dialect="hlo")


def test_program_size_does_not_grow_with_depth():
    """The scanned update step at 8 layers is within 10% of the one at 2 layers; the looped
    one grows with depth (what the scan removes)."""
    scan2, scan8 = (len(_update_hlo(n, True)) for n in (2, 8))
    assert abs(scan8 - scan2) <= 0.1 * scan2, (scan2, scan8)
    loop2, loop8 = (len(_update_hlo(n, False)) for n in (2, 8))
    assert loop8 > 2 * loop2, (loop2, loop8)


# ----------------------------------------------------------------------------- micro-batches
def _mesh(n, shape=None):
    return make_mesh(*(shape or (n, 1, 1)), devices=jax.devices()[:n])


def _batch(rows, p=6, n=5, seed=0):
    rng = np.random.default_rng(seed)
    prompt_mask = np.ones((rows, p), np.int32)
    prompt_mask[::3, :2] = 0
    response_mask = (np.arange(n)[None] < rng.integers(2, n + 1, (rows, 1))).astype(np.int32)
    old = (-rng.random((rows, n)) * response_mask).astype(np.float32)
    rewards = rng.integers(0, 2, rows).astype(np.float32)
    rewards[:2] = (1.0, 0.0)
    return make_batch(prompt_ids=rng.integers(4, 96, (rows, p)).astype(np.int32),
                      prompt_mask=prompt_mask,
                      response_ids=rng.integers(4, 96, (rows, n)).astype(np.int32),
                      response_mask=response_mask, rewards=rewards, sampler_logprobs=old,
                      old_logprobs=old)


def contiguous_micro_batches(x, k):
    """The split the update step used before: micro-batch j = rows [j*m, (j+1)*m)."""
    return x.reshape(k, x.shape[0] // k, *x.shape[1:])


def test_micro_batch_j_takes_every_kth_row():
    x = np.arange(12 * 2).reshape(12, 2)
    micro = np.asarray(split_micro_batches(jnp.asarray(x), 3))  # [k=3, m=4, 2]
    for j in range(3):
        for i in range(4):
            np.testing.assert_array_equal(micro[j, i], x[i * 3 + j])


@EIGHT
def test_strided_micro_batches_stay_on_every_data_device():
    mesh = _mesh(8)
    x = shard_batch(np.arange(32 * 5, dtype=np.float32).reshape(32, 5), mesh)

    @jax.jit
    def split(x):
        with activation_layout(mesh):
            return split_micro_batches(x, 2)

    out = split(x)
    assert out.sharding.is_equivalent_to(NamedSharding(mesh, P(None, ("data", "fsdp"))), 3)
    # every device holds 2 of the 16 rows of each of the 2 micro-batches
    assert {s.data.shape for s in out.addressable_shards} == {(2, 2, 5)}


def _one_step_params(monkeypatch, split, shape, k=2, rows=32):
    if split is not None:
        monkeypatch.setattr(update, "split_micro_batches", split)
    model = tiny_model(seed=0)
    mesh = _mesh(int(np.prod(shape)), shape)
    # plain SGD: parameter changes are the gradients (Adam would amplify float rounding in
    # near-zero components)
    optimizer = optax.apply_if_finite(optax.sgd(0.1), 2**30)
    batch = _batch(rows)
    step, state_sh = make_update_step(model, optimizer, StepConfig(group_size=4,
                                                                   micro_batches=k), mesh, batch)
    state, _, metrics = step(place_state(init_train_state(model, optimizer), state_sh),
                             shard_batch(batch, mesh))
    return [np.asarray(v[...]) for _, v in nnx.to_flat_state(state.params)], metrics


@EIGHT
@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2)], ids=["data8", "data2-fsdp2-tensor2"])
def test_strided_micro_batches_give_the_contiguous_gradients(monkeypatch, shape):
    strided, m_s = _one_step_params(monkeypatch, None, shape)
    contiguous, m_c = _one_step_params(monkeypatch, contiguous_micro_batches, shape)
    np.testing.assert_allclose(float(m_s["grad_norm"]), float(m_c["grad_norm"]), rtol=1e-5)
    np.testing.assert_allclose(float(m_s["loss"]), float(m_c["loss"]), rtol=1e-5, atol=1e-7)
    for a, b in zip(strided, contiguous):
        np.testing.assert_allclose(a, b, atol=1e-6)


def _compiled_update_hlo(monkeypatch, split):
    if split is not None:
        monkeypatch.setattr(update, "split_micro_batches", split)
    model = nnx.eval_shape(lambda: tiny_model())
    optimizer = make_optimizer(OptimizerConfig())
    batch = _batch(32)
    step, state_sh = make_update_step(model, optimizer, StepConfig(group_size=4,
                                                                   micro_batches=2),
                                      _mesh(8), batch)
    state = abstract_train_state(model, optimizer, state_sh)
    return step.jitted.lower(state, batch, None, step.other).compile().as_text()


INT_BATCH_COLLECTIVE = re.compile(
    r"= s32\[[^\]]*\][^=]*? (all-gather|all-to-all|collective-permute)(-start)?\(")


@EIGHT
def test_no_batch_rows_are_gathered_across_devices(monkeypatch):
    """On a data=8 mesh (32 rows, 2 micro-batches), the compiled update step moves no int32
    array (token ids, masks: the batch's rows) between devices: no all-gather, all-to-all or
    collective-permute of s32 anywhere in the program, the micro-batch loop included. The
    contiguous split does gather them (each micro-batch lives on half of the devices)."""
    assert not INT_BATCH_COLLECTIVE.findall(_compiled_update_hlo(monkeypatch, None))
    monkeypatch.undo()
    assert INT_BATCH_COLLECTIVE.findall(
        _compiled_update_hlo(monkeypatch, contiguous_micro_batches))


def _update_gflops(shape, micro_batches=2) -> float:
    """Per-device GFLOP of the compiled update step (64 rows x (16 + 32) tokens) of a small
    model on a ``(data, fsdp, tensor)`` mesh."""
    model = nnx.eval_shape(lambda: tiny_model(hidden_size=128, intermediate_size=256,
                                              num_heads=4, num_kv_heads=2, head_dim=32,
                                              vocab_size=512))
    optimizer = make_optimizer(OptimizerConfig())
    batch = _batch(64, p=16, n=32)
    step, state_sh = make_update_step(
        model, optimizer, StepConfig(group_size=4, micro_batches=micro_batches),
        _mesh(int(np.prod(shape)), shape), batch)
    state = abstract_train_state(model, optimizer, state_sh)
    cost = step.jitted.lower(state, batch, None, step.other).compile().cost_analysis()
    return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"] / 1e9


@EIGHT
def test_update_step_flops_per_device_are_a_share_of_the_work(monkeypatch):
    """On an fsdp=8 mesh each device computes at most 1.15x its 1/8 share of the single-
    device update step (8 micro-batches of 8 rows): no device repeats another's rows.
    Without strided micro-batches and activation constraints (the program before issue 14)
    each micro-batch sits on one device's rows and is computed on all of them."""
    share = _update_gflops((1, 1, 1), 8) / 8
    assert _update_gflops((1, 8, 1), 8) <= 1.15 * share
    monkeypatch.setattr(update, "split_micro_batches", contiguous_micro_batches)
    monkeypatch.setattr(update, "activation_layout", lambda *_: contextlib.nullcontext())
    assert _update_gflops((1, 8, 1), 8) > 1.3 * share  # measured 1.50x


def test_activation_constraints_only_inside_a_layout():
    model = tiny_model()
    ids = jnp.ones((2, 4), jnp.int32)
    graphdef, state = nnx.split(model)

    def forward(s):
        return nnx.merge(graphdef, s)(ids)

    assert "sharding_constraint" not in str(jax.make_jaxpr(forward)(state))

    def constrained(s):
        with activation_layout(_mesh(1)):
            return forward(s)

    text = str(jax.make_jaxpr(constrained)(state))
    # layer boundaries, q/k/v, the attention output, the MLP hidden (in the scanned layer
    # body, once), and the logits
    assert text.count("sharding_constraint") >= 8


# ----------------------------------------------------------------------------- TPU compiler
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="needs libtpu (pip install 'amrsd_jax[tpu-aot]')")
def test_tpu_compiler_compiles_the_scanned_update_step():
    devices = tpu_topology_devices("v5e", 8)
    assert devices is not None and devices[0].platform == "tpu"
    mesh = make_mesh(2, 4, 1, devices=devices)
    model = nnx.eval_shape(lambda: tiny_model(num_layers=4))
    optimizer = make_optimizer(OptimizerConfig())
    batch = _batch(32)
    step, state_sh = make_update_step(model, optimizer, StepConfig(group_size=4,
                                                                   micro_batches=2), mesh, batch)
    state = abstract_train_state(model, optimizer, state_sh)
    compiled = step.jitted.lower(state, batch, None, step.other).compile()
    assert compiled.memory_analysis().temp_size_in_bytes > 0
    assert "while" in compiled.as_text()  # the layer scan survives as a loop
