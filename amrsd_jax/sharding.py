"""Device mesh and the one rule table that maps logical axes onto it.

Mesh axes: ``data`` (pure data parallel), ``fsdp`` (data parallel with sharded weights
and optimizer state) and ``tensor`` (model parallel over heads / mlp / vocab).
Parameters carry logical names (see :mod:`amrsd_jax.models.decoder`; stacked layers add a
leading ``layers`` axis, never split). Activations are pinned with :func:`constrain` to
logical names too (``batch``, ``sequence``, ``activation_embed``, ``heads``, ``kv_heads``,
``head_dim``, ``mlp``, ``vocab``), at the places where XLA's propagation would otherwise be
free to choose a worse layout (layer boundaries, q/k/v, the MLP hidden, logits, the KV
cache); they take effect inside :func:`activation_layout` (the update step, the scorers, the
sampler enter it while tracing). A dimension that a mesh axis does not divide is left
replicated rather than failing, so tiny test models run on any mesh.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core.spmd import apply_rules
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from .distributed import global_arrays, put_global

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of axes, or None = replicated)
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("norm", None),
    ("layers", None),  # the stacked-layer axis: every device runs every layer
    # activation-only axes
    # rows of a token-id lookup into a table whose hidden axis is split over fsdp (the
    # embedding, the unembedding's target columns): split over data only, so every fsdp
    # device looks up its hidden slice of the same rows and one all-to-all over fsdp moves
    # the result (and, transposed, its gradient) to the batch layout. With the ids split over
    # data x fsdp, XLA's partitioner instead replicates the whole [batch, time, hidden]
    # gradient on every device when data and fsdp are both > 1 (its "involuntary full
    # rematerialization").
    ("lookup_batch", "data"),
    ("sequence", None),
    ("activation_embed", None),
    ("head_dim", None),
)


# The sampler's weight layout: weights whole on every device of a data x fsdp group (split
# over tensor only), so decoding a token needs no weight collective; the rows stay split
# over data x fsdp. One all-gather per sampling call replaces one per weight per token.
# (A lookup into a whole table needs no fsdp split of its own: its rows stay in the batch
# layout, so decoding adds no collective of token ids per token.)
ROLLOUT_RULES = tuple((name, None) if name == "embed"
                      else (name, dict(DEFAULT_RULES)["batch"]) if name == "lookup_batch"
                      else (name, axes) for name, axes in DEFAULT_RULES)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh; ``data=-1`` takes the devices that remain.

    Axes are ``Auto`` (GSPMD propagation), so model code needs no sharding annotations.
    """
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    if data == -1:
        if n % (fsdp * tensor):
            raise ValueError(f"{n} devices are not divisible by fsdp*tensor={fsdp * tensor}")
        data = n // (fsdp * tensor)
    if data * fsdp * tensor != n:
        raise ValueError(
            f"mesh data={data} x fsdp={fsdp} x tensor={tensor} = {data * fsdp * tensor} devices, "
            f"but {n} are available; set the mesh shape so the product equals {n}")
    return jax.make_mesh((data, fsdp, tensor), MESH_AXES, devices=devices,
                         axis_types=(AxisType.Auto,) * 3)


def single_device_mesh() -> Mesh:
    return make_mesh(1, 1, 1, devices=jax.devices()[:1])


def _fit_spec(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Drop mesh axes from dimensions they do not divide (replicate those instead)."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = math.prod(mesh.shape[a] for a in names)
        out.append(axes if names and dim % size == 0 else None)
    return P(*out)


def logical_to_spec(names: Sequence[str | None], shape: tuple[int, ...], mesh: Mesh,
                    rules=DEFAULT_RULES) -> P:
    """PartitionSpec for an array with logical axis ``names`` under ``rules``."""
    spec = apply_rules(P(*names), rules)
    return _fit_spec(spec, shape, mesh)


def state_shardings(state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES):
    """``NamedSharding`` for every variable of an (abstract or concrete) NNX state."""
    with nnx.logical_axis_rules(rules):
        specs = nnx.get_partition_spec(state)

    def fit(spec, leaf):
        shape = tuple(leaf.shape)
        if not isinstance(spec, P):
            spec = P()
        return NamedSharding(mesh, _fit_spec(spec, shape, mesh))

    return jax.tree.map(fit, specs, state, is_leaf=lambda x: isinstance(x, P) or x is None)


def batch_sharding(mesh: Mesh, ndim: int, rules=DEFAULT_RULES) -> NamedSharding:
    """Sharding of an activation whose leading axis is the batch."""
    return NamedSharding(mesh, P(dict(rules)["batch"], *([None] * (ndim - 1))))


def shard_batch(x, mesh: Mesh, rules=DEFAULT_RULES):
    """Place host arrays on the mesh, batch axis split over ``data`` x ``fsdp``.

    Falls back to replication when the batch does not divide the data axes.
    """
    def put(a):
        a = np.asarray(a) if not isinstance(a, jax.Array) else a
        spec = _fit_spec(P(dict(rules)["batch"]), a.shape, mesh) if a.ndim else P()
        return put_global(a, NamedSharding(mesh, spec))
    return jax.tree.map(put, x)


def rollout_weights(state: nnx.State, mesh: Mesh, dtype, rules=ROLLOUT_RULES) -> nnx.State:
    """Inside a traced program: the model's weights in the sampling layout (``rules``),
    floating weights cast to the compute ``dtype`` first (the layers cast them to it anyway,
    so the result is unchanged and the gathered copy is half the size of fp32 weights)."""
    shardings = state_shardings(state, mesh, rules)
    where = state_shardings(state, mesh)  # the weights' own (training) layout

    def put(x, sharding, own):
        if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != jnp.dtype(dtype):
            # cast in place first: otherwise XLA may gather the fp32 shards and cast after
            x = jax.lax.with_sharding_constraint(x.astype(dtype), own)
        return jax.lax.with_sharding_constraint(x, sharding)

    return jax.tree.map(put, state, shardings, where)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_model(model: nnx.Module, mesh: Mesh, rules=DEFAULT_RULES) -> nnx.Module:
    """Move every parameter of ``model`` onto ``mesh`` following ``rules`` (in place)."""
    state = nnx.state(model)
    # put_global: on a pod each process transfers only its own devices' slices
    sharded = global_arrays(state, state_shardings(state, mesh, rules))
    nnx.update(model, sharded)
    return model


# (mesh, rules) that constrain() pins activations to while a program is traced
_ACTIVATION_LAYOUT: contextvars.ContextVar = contextvars.ContextVar("activation_layout",
                                                                    default=None)


@contextlib.contextmanager
def activation_layout(mesh: Mesh | None, rules=DEFAULT_RULES):
    """Within this block :func:`constrain` pins activations onto ``mesh`` (``None``: off).

    Enter it inside the traced function (its Python body), so that the constraints are part
    of exactly the programs built for ``mesh``.
    """
    token = _ACTIVATION_LAYOUT.set(None if mesh is None else (mesh, rules))
    try:
        yield
    finally:
        _ACTIVATION_LAYOUT.reset(token)


def token_names(ndim: int, rows: str = "batch", *last: str) -> tuple[str, ...]:
    """Logical names of a ``[rows, time..., *last]`` array of ``ndim`` dimensions, e.g.
    ``token_names(3, "batch", "vocab") == ("batch", "sequence", "vocab")``."""
    return (rows,) + ("sequence",) * (ndim - 1 - len(last)) + last


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """``x`` with a sharding constraint from its logical axis ``names`` (one per dimension)
    under the active :func:`activation_layout`; unchanged outside one."""
    layout = _ACTIVATION_LAYOUT.get()
    if layout is None:
        return x
    mesh, rules = layout
    if len(names) != x.ndim:
        raise ValueError(f"logical names {tuple(names)} do not match an array of shape {x.shape}")
    spec = logical_to_spec(names, tuple(x.shape), mesh, rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
