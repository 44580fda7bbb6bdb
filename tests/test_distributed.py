"""Multi-process start-up: two CPU processes form one JAX job through the environment
variables ``maybe_initialize_distributed`` reads (the path a non-TPU cluster uses)."""

import os
import socket
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent("""
    import jax
    from amrsd_jax.distributed import maybe_initialize_distributed
    assert maybe_initialize_distributed()
    print(jax.process_index(), jax.process_count(), jax.local_device_count(),
          jax.device_count(), flush=True)
    jax.distributed.shutdown()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(script: str) -> list[str]:
    """Run ``script`` as 2 processes x 2 CPU devices of one JAX job; their stdout."""
    port = _free_port()
    procs = []
    for pid in range(2):
        env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                   JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid), JAX_PLATFORMS="cpu",
                   XLA_FLAGS="--xla_force_host_platform_device_count=2")
        procs.append(subprocess.Popen([sys.executable, "-c", script], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return [out for out, _ in outs]


def test_two_processes_form_one_job():
    rows = sorted(tuple(map(int, out.split())) for out in _two_processes(CHILD))
    assert rows == [(0, 2, 2, 4), (1, 2, 2, 4)]


DATA_PLANE = textwrap.dedent("""
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from amrsd_jax.distributed import (check_agreement, maybe_initialize_distributed, map_rows,
                                       process_share, put_global, to_host)
    maybe_initialize_distributed()
    me = jax.process_index()
    # verification-style host work: each process computes its share, all get every result
    seen = []
    out = map_rows(lambda xs: [(x, me) for x in xs if seen.append(x) is None], range(7))
    assert [x for x, _ in out] == list(range(7)), out
    assert sorted(seen) == list(range(7))[process_share(7)]  # only this process's share
    assert {p for _, p in out} == {0, 1}  # the work was split
    # host rows -> a global array -> the full value on every host
    mesh = jax.make_mesh((4,), ("rows",))
    rows = np.arange(24, dtype=np.int32).reshape(8, 3)
    g = put_global(rows, NamedSharding(mesh, P("rows")))
    assert not g.is_fully_addressable
    assert all(np.array_equal(s.data, rows[s.index]) for s in g.addressable_shards)
    assert np.array_equal(to_host(g * 2), rows * 2)
    check_agreement("a shape", (8, 3))  # the same everywhere: no error
    try:
        check_agreement("the reflection rows", [me])
    except RuntimeError as e:
        assert "the reflection rows" in str(e), e
        print("disagreement caught", flush=True)
    jax.distributed.shutdown()
""")


def test_data_plane_splits_host_work_and_catches_disagreement():
    """``map_rows`` splits host work between processes and gives every process all results;
    ``put_global`` places only this process's slices; ``check_agreement`` names a value
    the processes disagree on (instead of a hang in the next collective)."""
    for out in _two_processes(DATA_PLANE):
        assert "disagreement caught" in out
