"""Device mesh and the one rule table that maps logical axes onto it.

Mesh axes: ``data`` (pure data parallel), ``fsdp`` (data parallel with sharded weights
and optimizer state) and ``tensor`` (model parallel over heads / mlp / vocab).
Parameters carry logical names (see :mod:`amrsd_jax.models.decoder`); activations use
``batch``. A dimension that a mesh axis does not divide is left replicated rather than
failing, so tiny test models run on any mesh.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from flax.core.spmd import apply_rules
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

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
)


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
        return jax.device_put(a, NamedSharding(mesh, spec))
    return jax.tree.map(put, x)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_model(model: nnx.Module, mesh: Mesh, rules=DEFAULT_RULES) -> nnx.Module:
    """Move every parameter of ``model`` onto ``mesh`` following ``rules`` (in place)."""
    state = nnx.state(model)
    sharded = jax.device_put(state, state_shardings(state, mesh, rules))
    nnx.update(model, sharded)
    return model
