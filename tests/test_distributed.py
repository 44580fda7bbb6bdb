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


def test_two_processes_form_one_job():
    port = _free_port()
    procs = []
    for pid in range(2):
        env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                   JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid), JAX_PLATFORMS="cpu",
                   XLA_FLAGS="--xla_force_host_platform_device_count=2")
        procs.append(subprocess.Popen([sys.executable, "-c", CHILD], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    rows = sorted(tuple(map(int, out.split())) for out, _ in outs)
    assert rows == [(0, 2, 2, 4), (1, 2, 2, 4)]
