"""The multi-process data plane: starting ``jax.distributed`` and moving rows between the
hosts and the mesh. On one process every helper is a plain ``device_put``/``np.asarray``
or a no-op, so single-host runs pay nothing.

How a step's rows live on a pod (P processes, each driving its own chips):

* **Devices hold only their shards.** Every ``jit`` input is a global ``jax.Array`` built
  with :func:`put_global` (``jax.make_array_from_callback``: each process hands over only
  the slices its own devices hold; no cross-host check or transfer).
* **The control plane is replicated.** Every process holds the step's global rows on the
  host (prompt and response tokens: a few MB), and makes the same decisions on them (which
  rows to reflect on, prompt widths, buckets). Shapes therefore agree on every host by
  construction, and a run on P processes computes what a run on 1 process computes over
  the same mesh. :func:`check_agreement` turns a violation (e.g. a non-deterministic
  reward) into an error that names the value instead of a hang.
* **Host work that costs is split.** :func:`map_rows` runs a function (the verifier, a
  sandboxed test run) on this process's share of the rows only and all-gathers the
  results, so verification scales with the number of hosts.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable, Sequence, TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils

T = TypeVar("T")
R = TypeVar("R")


def maybe_initialize_distributed() -> bool:
    """``jax.distributed.initialize()`` when the environment describes a multi-process job
    (a coordinator address, or a multi-worker Cloud TPU slice). Returns whether it ran.

    On Cloud TPU VMs JAX finds the coordinator by itself (``initialize()`` with no
    arguments); elsewhere set ``JAX_COORDINATOR_ADDRESS=host:port``, ``JAX_NUM_PROCESSES``
    and ``JAX_PROCESS_ID`` on every process."""
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS") or _on_cloud_tpu_vm():
        if not jax.distributed.is_initialized():
            explicit = {}
            if env.get("JAX_NUM_PROCESSES") and env.get("JAX_PROCESS_ID"):
                explicit = dict(coordinator_address=env.get("JAX_COORDINATOR_ADDRESS"),
                                num_processes=int(env["JAX_NUM_PROCESSES"]),
                                process_id=int(env["JAX_PROCESS_ID"]))
            jax.distributed.initialize(**explicit)
        return True
    return False


def _on_cloud_tpu_vm() -> bool:
    """A Cloud TPU VM (single- or multi-worker, GCE or GKE): there ``initialize()`` with no
    arguments finds the workers itself (and gives one process on a single-host slice)."""
    env = os.environ
    if env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_PROCESS_ADDRESSES") \
            or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return True
    try:  # JAX's own test (TPU chips on the PCI bus), which loads no backend: initialize()
        from jax._src import hardware_utils  # must run before the backend starts
        return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
    except (ImportError, AttributeError, OSError):  # pragma: no cover - another JAX
        return False


def is_multiprocess() -> bool:
    return jax.process_count() > 1


# ----------------------------------------------------------------------------- host -> mesh
def put_global(x, sharding: jax.sharding.Sharding) -> jax.Array:
    """The host value ``x`` (the *global* value, the same on every process) as a global
    array with ``sharding``; each process transfers only its own devices' slices."""
    if not is_multiprocess():
        return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = put_global(jax.random.key_data(x), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    if isinstance(x, jax.Array) and not x.is_fully_addressable:  # already global
        return x if x.sharding == sharding else jax.device_put(x, sharding)
    x = np.asarray(x)  # a host value, or an array made eagerly on this host's devices
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def global_arrays(tree, shardings):
    """:func:`put_global` over a pytree of host values and a matching pytree of shardings."""
    return jax.tree.map(put_global, tree, shardings)


def placed(fn: Callable, place: Callable[[Any], jax.Array]) -> Callable:
    """``fn`` (a jitted program) with every host argument leaf (numpy, or an array on this
    host's devices only) put on the mesh by ``place`` first: a multi-process ``jit``
    accepts only global arrays. Global arrays (parameters, caches) pass unchanged. On one
    process ``fn`` itself is returned (``jit`` places host values); ``.lower`` stays
    ``fn``'s."""
    if not is_multiprocess():
        return fn

    def host_leaf(x) -> bool:
        return not (isinstance(x, jax.Array) and not x.is_fully_addressable)

    def call(*args):
        return fn(*jax.tree.map(lambda x: place(x) if host_leaf(x) else x, args))

    call.lower = fn.lower
    return call


# ----------------------------------------------------------------------------- mesh -> host
def to_host(x) -> np.ndarray:
    """A (possibly multi-host sharded) array as a full numpy array on this host."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


# ----------------------------------------------------------------------------- host work
def process_share(n: int) -> slice:
    """This process's contiguous share of ``n`` rows of host work (shares differ by at
    most one row; a process may get none)."""
    p, count = jax.process_index(), jax.process_count()
    return slice(p * n // count, (p + 1) * n // count)


def allgather_json(local: list) -> list:
    """Concatenate every process's list of JSON values, in process order (JSON rather
    than pickle: the lists carry model output)."""
    if not is_multiprocess():
        return list(local)
    blob = np.frombuffer(json.dumps(local).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([blob.size], np.int64)))
    sizes = sizes.ravel()
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:blob.size] = blob
    gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    out: list = []
    for row, size in zip(gathered, sizes):
        out.extend(json.loads(row[:int(size)].tobytes().decode()))
    return out


def map_rows(fn: Callable[[Sequence[T]], list[R]], items: Sequence[T], *,
             to_json: Callable[[R], Any] = lambda r: r,
             from_json: Callable[[Any], R] = lambda j: j) -> list[R]:
    """``fn(items)`` computed as each process's :func:`process_share` of ``items`` and
    all-gathered: the same list on every process, the work split over them. Results cross
    processes as JSON (``to_json`` / ``from_json``); on one process they are not encoded."""
    if not is_multiprocess():
        return list(fn(items))
    share = process_share(len(items))
    local = [to_json(r) for r in fn(items[share])] if share.stop > share.start else []
    return [from_json(j) for j in allgather_json(local)]


def all_processes(flag: bool) -> bool:
    """Whether ``flag`` holds on every process (e.g. "this checkpoint restored here")."""
    if not is_multiprocess():
        return bool(flag)
    return bool(np.asarray(multihost_utils.process_allgather(np.array([bool(flag)]))).all())


def barrier(name: str) -> None:
    """Wait until every process reaches ``name`` (e.g. after process 0 moved a file)."""
    if is_multiprocess():
        multihost_utils.sync_global_devices(name)


def check_agreement(name: str, value: Any) -> None:
    """Raise if ``value`` (a JSON value: shapes, counts, a config) differs between processes;
    a no-op on one process. A data-dependent shape that differs between hosts would
    otherwise make them compile different programs and hang in a collective."""
    if not is_multiprocess():
        return
    text = json.dumps(value, sort_keys=True, default=repr)
    digest = np.frombuffer(hashlib.sha256(text.encode()).digest(), np.uint8)
    digests = np.asarray(multihost_utils.process_allgather(digest))
    if (digests != digests[0]).any():
        raise RuntimeError(f"processes disagree on {name} (this process: {value!r}); every "
                           "process must see the same config, data and reward results")
