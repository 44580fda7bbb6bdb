"""Run checkpoints: exact round trip (incl. shardings), resume-equivalence, retention, atomicity."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from amrsd_jax.sharding import make_mesh, shard_batch
from amrsd_jax.train.checkpoint import (CheckpointMismatch, RunCheckpointer, abstract_like,
                                        parameter_mismatch)
from amrsd_jax.batch import make_batch
from amrsd_jax.update import (OptimizerConfig, StepConfig, TrainState, init_train_state,
                              make_optimizer, make_update_step, place_state)

from conftest import tiny_model

G = 4  # group size: the batch has 2 prompts x G rollouts

DATA_STATE = {"epoch": 1, "index": 37, "seed": 5, "order": [3, 1, 2]}
CONFIG = {"model": {"name": "tiny", "dtype": "float32"}, "optimizer": {"learning_rate": 1e-2},
          "method": "grpo", "level": [1, 2]}
EXTRA = {"skipped_total": 2, "wall_time": 12.5, "note": None}


@pytest.fixture(scope="module")
def tiny():
    """A tiny model, its optimizer and a host batch (shared: model init is the slow part)."""
    model = tiny_model(seed=0, num_layers=1)  # one layer: half the compile time
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-2, max_grad_norm=1.0))
    return model, optimizer, _host_batch()


def _host_batch(seed=0):
    """A GRPO batch without scoring the model: a random tiny model is ~uniform over its 96
    tokens, so old log-probs of -log(96) keep the PPO ratio near 1 (unclipped gradients)."""
    rng = np.random.default_rng(seed)
    b, p, n = 2 * G, 6, 5
    rewards = rng.integers(0, 2, b).astype(np.float32)
    rewards[0], rewards[1] = 1.0, 0.0  # a mixed group: non-zero advantages
    old = np.full((b, n), -np.log(96.0), np.float32)
    return make_batch(prompt_ids=rng.integers(4, 96, (b, p)).astype(np.int32),
                      prompt_mask=np.ones((b, p), np.int32),
                      response_ids=rng.integers(4, 96, (b, n)).astype(np.int32),
                      response_mask=np.ones((b, n), np.int32), rewards=rewards,
                      sampler_logprobs=old, old_logprobs=old)


def _setup(tiny, mesh_shape):
    """One real update step on ``mesh_shape`` so the Adam moments and counters are non-zero."""
    model, optimizer, host_batch = tiny
    mesh = make_mesh(*mesh_shape, devices=jax.devices()[:int(np.prod(mesh_shape))])
    step_fn, state_sh = make_update_step(model, optimizer, StepConfig(group_size=G), mesh,
                                         host_batch)
    batch = shard_batch(host_batch, mesh)
    # copy: on one device place_state aliases the model's buffers, which step_fn donates
    fresh = jax.tree.map(jnp.copy, init_train_state(model, optimizer))
    state, _, _ = step_fn(place_state(fresh, state_sh), batch)
    # a teacher (EMA-like) tree with its own values, sharded like the params
    teacher = jax.device_put(jax.tree.map(lambda x: 0.5 * x + 1.0, state.params),
                             state_sh.params)
    return step_fn, state_sh, state, teacher, batch


def _assert_same_tree(restored, host_ref, ref_structure, ref_shardings):
    """Same pytree structure (node types included), same values, dtypes and shardings."""
    assert jax.tree.structure(restored) == ref_structure
    got = jax.tree.leaves(restored)
    assert len(got) == len(host_ref) == len(ref_shardings)
    for g, want, sh in zip(got, host_ref, ref_shardings):
        assert isinstance(g, jax.Array) and g.dtype == want.dtype and g.shape == want.shape
        assert g.sharding == sh, (g.sharding, sh)
        np.testing.assert_array_equal(np.asarray(g), want)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_round_trip_and_resume_continues_identically(tmp_path, tiny):
    # on the 2x2x2 mesh (sharded params and moments, replicated counters); the single-device
    # round trip is below (a second compile of the step would double this file's runtime)
    step_fn, state_sh, state, teacher, batch = _setup(tiny, (2, 2, 2))
    key = jax.random.fold_in(jax.random.key(42), 3)
    ref_structure = jax.tree.structure(state)
    ref_shardings = [x.sharding for x in jax.tree.leaves(state)]
    host_state = [np.asarray(x) for x in jax.tree.leaves(state)]  # copy: step_fn donates
    host_teacher = [np.asarray(x) for x in jax.tree.leaves(teacher)]
    assert int(state.step) == 1 and any(
        isinstance(t, nnx.State) and any(np.any(np.asarray(v) != 0) for v in jax.tree.leaves(t))
        for t in jax.tree.leaves(state.opt_state, is_leaf=lambda x: isinstance(x, nnx.State)))

    ckpt = RunCheckpointer(tmp_path / "ckpt", async_save=True)
    assert ckpt.save(1, train_state=state, teacher_params=teacher, rng_key=key,
                     data_state=DATA_STATE, config=CONFIG, extra=EXTRA)
    # the save has copied the arrays: donating them to the next step right away is safe
    cont_state, _, cont_metrics = step_fn(state, batch)
    cont_host = [np.asarray(x) for x in jax.tree.leaves(cont_state)]
    ckpt.close()

    # a fresh checkpointer (as after a restart) restores into the abstract, sharded state
    ckpt = RunCheckpointer(tmp_path / "ckpt")
    assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
    abstract = abstract_like(jax.eval_shape(lambda: cont_state), state_sh)
    run = ckpt.restore(abstract_train_state=abstract)
    assert run.step == 1
    assert type(run.train_state).__name__ == "TrainState"
    assert isinstance(run.train_state.params, nnx.State)
    _assert_same_tree(run.train_state, host_state, ref_structure, ref_shardings)
    _assert_same_tree(run.teacher_params, host_teacher, jax.tree.structure(teacher),
                      [x.sharding for x in jax.tree.leaves(teacher)])
    assert jax.dtypes.issubdtype(run.rng_key.dtype, jax.dtypes.prng_key)
    assert jax.random.key_impl(run.rng_key) == jax.random.key_impl(key)
    np.testing.assert_array_equal(jax.random.key_data(run.rng_key), jax.random.key_data(key))
    assert (run.data_state, run.config, run.extra) == (DATA_STATE, CONFIG, EXTRA)

    # resuming from the restored state gives bit-identical results
    resumed, _, metrics = step_fn(run.train_state, batch)
    assert jax.tree.structure(resumed) == jax.tree.structure(cont_state)
    for a, b in zip(jax.tree.leaves(resumed), cont_host):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert float(metrics["loss"]) == float(cont_metrics["loss"])
    assert step_fn.jitted._cache_size() == 1  # restored state hits the same compiled step
    ckpt.close()


@pytest.fixture(scope="module")
def single_state(tiny):
    """A single-device TrainState after one (optimizer-only, one small compile) Adam step."""
    model, optimizer, _ = tiny

    @jax.jit
    def one_step(params):
        state = TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32))
        grads = jax.tree.map(lambda p: jnp.cos(p) * 1e-2, params)
        updates, opt_state = optimizer.update(grads, state.opt_state, params)
        return TrainState(optax.apply_updates(params, updates), opt_state, state.step + 1)

    return one_step(nnx.state(model, nnx.Param))


def test_single_device_round_trip_raw_key_no_teacher_retention_async(tmp_path, single_state):
    state = single_state
    abstract = abstract_like(state)  # single-device shardings of the concrete arrays
    host = [np.asarray(x) for x in jax.tree.leaves(state)]
    raw_key = jax.random.PRNGKey(7)  # legacy raw uint32[2] key
    with RunCheckpointer(tmp_path, max_to_keep=2, async_save=True) as ckpt:
        assert ckpt.latest_step() is None and ckpt.all_steps() == []
        for step in (10, 20, 30):
            state = state._replace(step=jnp.int32(step))
            assert ckpt.save(step, train_state=state, rng_key=raw_key,
                             data_state={"index": step}, config=CONFIG)
            # committed steps only: the one being written is not "latest" yet
            assert ckpt.latest_step() in (step, None if step == 10 else step - 10)
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [20, 30] and ckpt.latest_step() == 30
        assert not ckpt.save(30, train_state=state, rng_key=raw_key, data_state={},
                             config={})  # never overwrite a step
        run = ckpt.restore(abstract_train_state=abstract)
    assert sorted(int(p) for p in os.listdir(tmp_path) if p.isdigit()) == [20, 30]
    assert run.step == 30 and int(run.train_state.step) == 30
    _assert_same_tree(run.train_state, host[:-1] + [np.int32(30)], jax.tree.structure(state),
                      [x.sharding for x in jax.tree.leaves(state)])
    assert run.teacher_params is None and run.extra == {} and run.data_state == {"index": 30}
    assert run.rng_key.dtype == jnp.uint32
    np.testing.assert_array_equal(run.rng_key, raw_key)
    with RunCheckpointer(tmp_path) as ckpt:
        assert ckpt.restore(20, abstract_train_state=abstract).data_state == {"index": 20}
        with pytest.raises(FileNotFoundError, match="step 10"):
            ckpt.restore(10, abstract_train_state=abstract)


def test_uncommitted_checkpoint_is_never_loaded(tmp_path, single_state, monkeypatch):
    from orbax.checkpoint._src.path import atomicity

    state = single_state
    abstract = abstract_like(state)
    with RunCheckpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, train_state=state, rng_key=jax.random.key(0), data_state={"i": 1},
                  config={})

    # a save that dies right before orbax's commit (rename of the tmp dir) leaves a fully
    # written but uncommitted step behind, exactly like a crash/preemption would
    async def crash(*args, **kwargs):
        raise KeyboardInterrupt("simulated crash before commit")

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", crash)
    ckpt = RunCheckpointer(tmp_path, async_save=False)
    with pytest.raises(KeyboardInterrupt, match="simulated crash"):
        ckpt.save(2, train_state=state._replace(step=jnp.int32(2)), rng_key=jax.random.key(0),
                  data_state={"i": 2}, config={})
    monkeypatch.undo()
    assert ckpt.latest_step() == 1
    ckpt.close()
    tmp_dirs = [p for p in os.listdir(tmp_path) if ".orbax-checkpoint-tmp" in p]
    assert tmp_dirs and tmp_dirs[0].startswith("2.")
    # plus a hand-made half-written step named the way orbax names its tmp dirs
    os.makedirs(tmp_path / "3.orbax-checkpoint-tmp" / "state")

    # only directories orbax committed count: a reader sees step 1 and touches nothing
    # (the tmp dirs might be another job's save in progress) ...
    reader = RunCheckpointer(tmp_path, read_only=True)
    assert reader.all_steps() == [1] and reader.restore(abstract_train_state=abstract).step == 1
    assert len([p for p in os.listdir(tmp_path) if ".orbax-checkpoint-tmp" in p]) == 2
    with pytest.raises(PermissionError):
        reader.save(4, train_state=state, rng_key=None, data_state={}, config={})
    reader.close()
    # ... and a restarted writer sees step 1 and drops the leftovers
    with RunCheckpointer(tmp_path) as ckpt:
        assert ckpt.all_steps() == [1] and ckpt.latest_step() == 1
        run = ckpt.restore(abstract_train_state=abstract)
        assert run.step == 1 and run.data_state == {"i": 1}
        with pytest.raises(FileNotFoundError):
            ckpt.restore(2, abstract_train_state=abstract)
    assert not [p for p in os.listdir(tmp_path) if ".orbax-checkpoint-tmp" in p]


def test_restore_from_empty_directory_names_it(tmp_path, single_state):
    state = single_state
    with RunCheckpointer(tmp_path / "empty") as ckpt:
        assert ckpt.latest_step() is None
        with pytest.raises(FileNotFoundError, match=str(tmp_path / "empty")):
            ckpt.restore(abstract_train_state=abstract_like(state))


@pytest.mark.parametrize("other", [dict(num_layers=2), dict(scan_layers=False),
                                   dict(hidden_size=48)], ids=["depth", "looped", "width"])
def test_another_models_checkpoint_is_a_mismatch_not_damage(tmp_path, single_state, other):
    """A step saved for another model (or with model.scan_layers changed) raises one error
    naming the differing parameters, and is left where it is (damage is moved aside)."""
    with RunCheckpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(3, train_state=single_state, rng_key=jax.random.key(0), data_state={},
                  config=CONFIG)
    model = nnx.eval_shape(lambda: tiny_model(seed=0, **{"num_layers": 1, **other}))
    optimizer = make_optimizer(OptimizerConfig())
    abstract = jax.eval_shape(lambda: init_train_state(model, optimizer))
    with RunCheckpointer(tmp_path) as ckpt:
        with pytest.raises(CheckpointMismatch, match=r"step 3 .* another model's parameters: "
                           r"\d+ (parameter\(s\) missing|of another shape)"):
            ckpt.restore_intact(abstract_train_state=abstract)
        assert ckpt.all_steps() == [3]  # not moved aside
        # the model it was saved for still restores
        assert ckpt.restore(3, abstract_train_state=abstract_like(single_state)).step == 3


def test_parameter_mismatch_names_each_kind_of_difference():
    saved = {"a": (2, 3), "b": (4,), "c": (1,)}
    assert parameter_mismatch(saved, dict(saved)) is None
    diff = parameter_mismatch(saved, {"a": (2, 3), "b": (5,), "d": (1,)})
    assert diff == ("1 parameter(s) missing (e.g. d); 1 not in this model (e.g. c); "
                    "1 of another shape (e.g. b: saved (4,), expected (5,))")


def test_abstract_like_broadcasts_prefix_shardings():
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    tree = {"a": jnp.zeros((2, 3)), "b": (jnp.ones(4, jnp.int32), jnp.zeros(()))}
    out = abstract_like(tree, sh)
    assert jax.tree.structure(out) == jax.tree.structure(tree)
    assert all(isinstance(x, jax.ShapeDtypeStruct) and x.sharding == sh
               for x in jax.tree.leaves(out))
    assert jax.tree.leaves(out)[1].dtype == jnp.int32


_FULL_DISK = """
import resource, signal, sys
import jax, jax.numpy as jnp
from amrsd_jax.train.checkpoint import CheckpointWriteError, RunCheckpointer
from amrsd_jax.update import TrainState

state = TrainState({"w": jnp.arange(100_000.0)}, {"m": jnp.zeros(8)}, jnp.int32(0))
ckpt = RunCheckpointer(sys.argv[1], async_save=True)
ckpt.save(1, train_state=state, rng_key=jax.random.key(0), data_state={}, config={})
ckpt.wait_until_finished()
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))  # the disk is "full"
try:
    ckpt.save(2, train_state=state, rng_key=jax.random.key(0), data_state={}, config={})
    ckpt.wait_until_finished()
except CheckpointWriteError as e:
    print("REPORTED:", e)
finally:
    ckpt.close()
"""


def test_full_disk_is_reported_in_a_few_lines(tmp_path):
    """A save that fails in orbax's background thread (a full disk: writes past a file-size
    limit fail): one CheckpointWriteError line naming the step, instead of ~300 lines of
    orbax tracebacks; step 1 stays intact and restorable."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _FULL_DISK, str(tmp_path)],
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    out = (proc.stdout + proc.stderr).strip().splitlines()
    reported = [line for line in out if line.startswith("REPORTED:")]
    assert len(reported) == 1, out
    assert "writing checkpoint step 2" in reported[0] and "[1] are intact" in reported[0]
    # orbax's own records: one line each, no tracebacks through orbax (an asyncio "Event
    # loop is closed" race inside orbax's writer threads may still add a short one)
    assert not [line for line in out if "site-packages/orbax" in line], out
    assert len(out) <= 20, out
    with RunCheckpointer(tmp_path) as ckpt:
        assert ckpt.all_steps() == [1]
        assert ckpt.restore(abstract_train_state=abstract_like(
            TrainState({"w": jax.ShapeDtypeStruct((100_000,), jnp.float32)},
                       {"m": jax.ShapeDtypeStruct((8,), jnp.float32)},
                       jax.ShapeDtypeStruct((), jnp.int32)))).step == 1
