"""Multi-process plumbing: starting ``jax.distributed`` and moving rows between this
host and global arrays. On one process every helper is a no-op or a plain ``np.asarray``.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.experimental import multihost_utils


def maybe_initialize_distributed() -> bool:
    """``jax.distributed.initialize()`` when the environment describes a multi-process job
    (a coordinator address, or a multi-worker Cloud TPU slice). Returns whether it ran.

    On clusters JAX detects by itself (Cloud TPU, SLURM, Open MPI, Kubernetes) nothing else
    is needed; elsewhere set ``JAX_COORDINATOR_ADDRESS=host:port``, ``JAX_NUM_PROCESSES``
    and ``JAX_PROCESS_ID`` on every process."""
    env = os.environ
    multi_tpu = "," in env.get("TPU_WORKER_HOSTNAMES", "")
    if env.get("JAX_COORDINATOR_ADDRESS") or multi_tpu:
        if not jax.distributed.is_initialized():
            explicit = {}
            if env.get("JAX_NUM_PROCESSES") and env.get("JAX_PROCESS_ID"):
                explicit = dict(coordinator_address=env.get("JAX_COORDINATOR_ADDRESS"),
                                num_processes=int(env["JAX_NUM_PROCESSES"]),
                                process_id=int(env["JAX_PROCESS_ID"]))
            jax.distributed.initialize(**explicit)
        return True
    return False


def to_host(x) -> np.ndarray:
    """A (possibly multi-host sharded) array as a full numpy array on this host."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def global_arrays(tree, shardings):
    """Per-process host rows -> global arrays with ``shardings`` (a matching pytree);
    on one process the tree is returned unchanged (``jit`` places it)."""
    if jax.process_count() == 1:
        return tree
    return jax.tree.map(
        lambda x, s: x if isinstance(x, jax.Array)
        else jax.make_array_from_process_local_data(s, np.asarray(x)), tree, shardings)
