"""``python run.py bench scale``: how the update step scales with depth and devices.

Two measurements, both ahead of time from shapes alone (``nnx.eval_shape``: no weights, no
step is run), on the ``(data, fsdp, tensor)`` mesh of ``--mesh`` fake CPU devices (or, with
``--tpu v4|v5e|v6e`` and libtpu installed, a compile-only TPU topology and the TPU compiler):

1. **depth**: the update step of the ``--model`` preset cut to ``--layers`` layers (2, 8, 32),
   with its layers looped (``scan_layers=False``) and scanned (``scan_layers=True``):
   lowering and compile seconds, and the size of the program (lines of the HLO before
   XLA's optimisations, and of the compiled, partitioned HLO);
2. **layout**: the update step of the whole preset with ``--micro-batches`` micro-batches
   split strided (:func:`~amrsd_jax.update.split_micro_batches`, the library's) and
   contiguous (the split it replaced), each with and without the activation sharding
   constraints (without both: the program before issue 14, layers scanned), and under each
   remat policy: per-device FLOPs
   (``compiled.cost_analysis()``: the partitioned program is one device's), per-device
   temporary memory (``compiled.memory_analysis()``) and the number of collectives moving
   int32 batch rows (token ids, masks) between devices.

On CPU the memory is XLA:CPU's, an upper bound of the TPU's (no bf16 arithmetic, little
rematerialisation); the FLOPs are the partitioned program's and do not depend on the
backend much. Results: a table and ``--out`` JSON.
"""

from __future__ import annotations

import contextlib
import re
import time
from unittest import mock

import jax
from flax import nnx

from .. import update
from ..batch import abstract_batch
from ..methods import make_method
from ..models.decoder import Decoder
from ..models.presets import architecture_config
from ..sharding import make_mesh
from ..train.aot import ensure_fake_devices, tpu_topology_devices
from ..update import OptimizerConfig, StepConfig, init_train_state, make_optimizer
from .harness import format_table, progress, write_results

# XLA:CPU code generation only: lowers compile time, leaves the HLO passes (partitioning,
# fusion, buffer assignment: the sizes, FLOPs and memory reported) unchanged
CPU_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0,
                        "xla_llvm_disable_expensive_passes": True}
BATCH_COLLECTIVE = re.compile(
    r"= s32\[[^\]]*\][^=]*? (all-gather|all-to-all|collective-permute)(-start)?\(")


def contiguous_micro_batches(x, k):
    """The micro-batch split the update step used before: micro-batch j = rows
    ``[j*m, (j+1)*m)`` (lives on 1/k of the data devices)."""
    return x.reshape(k, x.shape[0] // k, *x.shape[1:])


def _lower_update_step(arch, mesh, rows, prompt, response, micro_batches):
    """The lowered update step (GRPO) of architecture ``arch`` from abstract shapes."""
    model = nnx.eval_shape(lambda: Decoder(arch, rngs=nnx.Rngs(0)))
    optimizer = make_optimizer(OptimizerConfig())
    method = make_method("grpo")
    batch = abstract_batch(method.fields, rows=rows, prompt=prompt, response=response,
                           mesh=mesh)
    step, state_sh = update.make_update_step(model, optimizer, StepConfig(
        method=method, group_size=8 if rows % 8 == 0 else 2, micro_batches=micro_batches),
        mesh, batch)
    state = jax.eval_shape(lambda: init_train_state(model, optimizer))
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         state, state_sh)
    return step.jitted.lower(state, batch, None, step.other)


def _compile(lowered, platform):
    """``(compiled, wall s, CPU s)``: CPU seconds of this process (the compiler's threads),
    comparable on a shared machine where wall seconds are not."""
    t0, c0 = time.perf_counter(), time.process_time()
    if platform == "cpu":
        compiled = lowered.compile(compiler_options=CPU_COMPILER_OPTIONS)
    else:
        compiled = lowered.compile()
    return compiled, time.perf_counter() - t0, time.process_time() - c0


def _lines(text: str) -> int:
    return text.count("\n") + 1


def depth_rows(base, mesh, shape, layers, layouts, platform) -> list[dict]:
    """Lower/compile seconds and HLO lines of the update step at each depth, for each layer
    layout (``loop`` / ``scan``)."""
    out = []
    for n in layers:
        for scan in [layout == "scan" for layout in layouts]:
            arch = base.replace(num_layers=n, scan_layers=scan)
            t0 = time.perf_counter()
            lowered = _lower_update_step(arch, mesh, *shape)
            lower_s = time.perf_counter() - t0
            hlo_lines = _lines(lowered.as_text(dialect="hlo"))
            compiled, compile_s, compile_cpu_s = _compile(lowered, platform)
            row = {"layers": n, "layout": "scan" if scan else "loop", "lower_s": lower_s,
                   "compile_s": compile_s, "compile_cpu_s": compile_cpu_s,
                   "hlo_lines": hlo_lines,
                   "compiled_hlo_lines": _lines(compiled.as_text())}
            progress("scale", f"{n} layers, {row['layout']}: lower {lower_s:.1f}s, compile "
                              f"{compile_s:.1f}s ({compile_cpu_s:.1f} CPU s), HLO {hlo_lines} "
                              f"lines, compiled {row['compiled_hlo_lines']} lines")
            out.append(row)
    return out


def layout_rows(base, mesh, shape, policies, platform) -> list[dict]:
    """Per-device FLOPs, temporary memory and batch-row collectives of the whole model's
    update step: strided vs contiguous micro-batches, with and without activation
    constraints, and each remat policy."""
    variants = [(split, constrained, "none") for constrained in (True, False)
                for split in ("strided", "contiguous")]
    variants += [("strided", True, p) for p in policies if p != "none"]
    out = []
    for split, constrained, policy in variants:
        arch = base.replace(remat_policy=policy, scan_layers=True)
        with contextlib.ExitStack() as patches:
            if split == "contiguous":
                patches.enter_context(mock.patch.object(update, "split_micro_batches",
                                                        contiguous_micro_batches))
            if not constrained:  # the update step traced outside any activation layout
                patches.enter_context(mock.patch.object(
                    update, "activation_layout", lambda *_: contextlib.nullcontext()))
            lowered = _lower_update_step(arch, mesh, *shape)
        compiled, compile_s, compile_cpu_s = _compile(lowered, platform)
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        memory = compiled.memory_analysis()
        row = {"micro_batches": split, "activation_constraints": constrained,
               "remat_policy": policy,
               "gflops_per_device": float(cost.get("flops", float("nan"))) / 1e9,
               "temp_gib_per_device": memory.temp_size_in_bytes / 2**30,
               "argument_gib_per_device": memory.argument_size_in_bytes / 2**30,
               "batch_row_collectives": len(BATCH_COLLECTIVE.findall(compiled.as_text())),
               "compile_s": compile_s, "compile_cpu_s": compile_cpu_s}
        progress("scale", f"{split} micro-batches, constraints "
                          f"{'on' if constrained else 'off'}, remat {policy}: "
                          f"{row['gflops_per_device']:.1f} GFLOP, temp "
                          f"{row['temp_gib_per_device']:.2f} GiB per device, "
                          f"{row['batch_row_collectives']} batch-row collectives")
        out.append(row)
    return out


def _devices(args, n):
    if args.tpu:
        devices = tpu_topology_devices(args.tpu, n)
        if devices is None:
            raise SystemExit(f"--tpu {args.tpu}: needs libtpu (pip install 'amrsd_jax[tpu-aot]')"
                             f" and a v4 / v5e / v6e slice of {n} chips")
        return devices
    ensure_fake_devices(n)
    return jax.devices()[:n]


def main(args) -> int:
    mesh_shape = tuple(int(x) for x in args.mesh.split(","))
    n = mesh_shape[0] * mesh_shape[1] * mesh_shape[2]
    devices = _devices(args, n)
    platform = devices[0].platform
    mesh = make_mesh(*mesh_shape, devices=devices)
    base = architecture_config(args.model, dtype=args.dtype, param_dtype="float32")
    shape = (args.rows, args.prompt_tokens, args.response_tokens, args.micro_batches)
    if args.rows % (args.micro_batches * mesh_shape[0] * mesh_shape[1]):
        raise SystemExit(f"--rows {args.rows} must split into {args.micro_batches} micro-batches"
                         f" that divide over data x fsdp = {mesh_shape[0] * mesh_shape[1]}")
    layers = [int(x) for x in args.layers.split(",") if x]
    policies = [p for p in args.remat_policies.split(",") if p]
    progress("scale", f"{args.model} ({base.num_layers} layers, {args.dtype} compute), update "
                      f"step of {args.rows} rows x ({args.prompt_tokens}+{args.response_tokens})"
                      f" tokens, {args.micro_batches} micro-batches, mesh data x fsdp x tensor "
                      f"= {mesh_shape} on {devices[0].device_kind}")
    layouts = [x for x in args.layer_layouts.split(",") if x]
    if set(layouts) - {"loop", "scan"}:
        raise SystemExit(f"--layer-layouts takes loop and/or scan, got {args.layer_layouts!r}")
    depth = depth_rows(base, mesh, shape, layers, layouts, platform) if layers else []
    layout = layout_rows(base, mesh, shape, policies, platform) if not args.skip_layout else []

    table = [["layers", "layout", "lower s", "compile s", "compile CPU s", "HLO lines",
              "compiled lines"]]
    table += [[str(r["layers"]), r["layout"], f"{r['lower_s']:.1f}", f"{r['compile_s']:.1f}",
               f"{r['compile_cpu_s']:.1f}", str(r["hlo_lines"]), str(r["compiled_hlo_lines"])]
              for r in depth]
    print(format_table(table))
    if layout:
        print()
        table = [["micro-batches", "constraints", "remat", "GFLOP/device", "temp GiB/device",
                  "args GiB/device", "batch-row collectives"]]
        table += [[r["micro_batches"], "on" if r["activation_constraints"] else "off",
                   r["remat_policy"], f"{r['gflops_per_device']:.1f}",
                   f"{r['temp_gib_per_device']:.2f}", f"{r['argument_gib_per_device']:.2f}",
                   str(r["batch_row_collectives"])] for r in layout]
        print(format_table(table))
    write_results({"bench": "scale", "model": args.model, "dtype": args.dtype,
                   "mesh": dict(zip(("data", "fsdp", "tensor"), mesh_shape)),
                   "device_kind": devices[0].device_kind, "platform": platform,
                   "rows": args.rows, "prompt_tokens": args.prompt_tokens,
                   "response_tokens": args.response_tokens,
                   "micro_batches": args.micro_batches, "depth": depth, "layout": layout,
                   "memory_note": ("XLA:CPU memory: an upper bound of the TPU's"
                                   if platform == "cpu" else "TPU compiler memory")},
                  args.out)
    return 0
