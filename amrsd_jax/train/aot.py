"""``python run.py train --config X --dry-run``: will this run fit in the accelerator's memory?

:func:`dry_run` builds the run's programs with the trainer's own builder,
:func:`~amrsd_jax.programs.build_programs`, on the abstract model (``nnx.eval_shape``: shapes
only, no weights), the ``(data, fsdp, tensor)`` mesh and the update batch of the run's real
shapes, and compiles the sampler (the largest KV cache of the rollout and the method's own
sampling passes), the scorers and the update step ahead of time from ``ShapeDtypeStruct``s
that carry the real shardings (a method's own extra programs, e.g. OAR's importance pass,
are not compiled here). XLA's ``memory_analysis()`` of each compiled program gives the
per-device bytes of its arguments, outputs and temporaries; adding what stays resident on the
device during that phase (optimizer moments, teacher / reference weight copies) gives a
per-device peak to compare with the HBM budget.

With ``libtpu`` installed (``pip install libtpu``; no TPU needed) and a v4 / v5e / v6e budget,
the programs are compiled by the TPU compiler itself for a compile-only topology of the slice
(``jax.experimental.topologies``; v4 in megacore mode, one device per chip as in a real run),
so the numbers are the TPU's. Otherwise the mesh is made
of fake CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=N``, which must be
set before JAX starts): :func:`main_dry_run` re-executes itself in a subprocess with that
flag when the current process has too few devices, so the check runs on a laptop.
CPU-compiled memory is only an *estimate* of the TPU one: the program and its shardings are
the same, but TPU layouts (tiling / padding) and fusion differ, XLA:CPU computes bf16 in f32
and mostly ignores rematerialisation, so with ``model.remat_policy`` it is a loose upper
bound.

Command line (also reachable as ``python run.py train --config X --dry-run``)::

    python -m amrsd_jax.train.aot --config configs/tpu_qwen2.5-math-1.5b_gsm8k_v5e-8.yaml \
        [--hbm-gib 16 | --tpu v5e] [--target auto|cpu|tpu] [--json out.json] [--no-sampler]
        [key=value ...]

``key=value`` overrides go to the :class:`~amrsd_jax.train.config.TrainConfig`, except
``dry_run.hbm_gib=..``, ``dry_run.tpu=..``, ``dry_run.target=auto|cpu|tpu``,
``dry_run.devices=..``, ``dry_run.sampler=..`` and ``dry_run.json=..``, which set the
options (so ``run.py train --dry-run`` needs no extra flags). Exit code: 0 fits (or only
the CPU upper-bound estimate is over the budget: reported as such, not conclusive), 1 does
not fit on the TPU compiler's numbers, 2 configuration error.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax._src import xla_bridge
from jax.experimental import topologies
from jax.sharding import NamedSharding, PartitionSpec

from .. import hlo
from ..config import ConfigError
from ..models.decoder import Decoder
from ..models.presets import PRESETS, architecture_config, match_preset, preset_names
from ..programs import Programs, build_programs
from ..rollout.sampler import SamplingConfig, bucket_length, resolve_pad_id
from ..sharding import make_mesh
from ..update import TrainState, make_optimizer
from .config import check_mesh, load_train_config

GIB = 1024 ** 3

# HBM per JAX device (one chip; v4 / v5p chips are one megacore device each)
HBM_GIB = {"v4": 32.0, "v5e": 16.0, "v5p": 95.0, "v6e": 32.0}
DEFAULT_TPU = "v5e"

_COUNT_FLAG = "--xla_force_host_platform_device_count"
_CHILD_ENV = "AMRSD_DRY_RUN_CHILD"
# CPU backend codegen only: halves compile time, leaves the HLO passes (sharding, fusion,
# buffer assignment, hence memory_analysis) unchanged
_CPU_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0,
                         "xla_llvm_disable_expensive_passes": True}
_OPTION_KEYS = ("hbm_gib", "tpu", "devices", "sampler", "json", "target")
# Compile-only topologies of libtpu (no TPU attached) with ``n`` devices, one per chip as in
# a real run (v4 in megacore mode: its chip's two TensorCores are one device)
_GRID_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
            256: "16x16"}
_TPU_TOPOLOGIES = {
    "v5e": {n: f"v5e:{g}" for n, g in _GRID_2D.items()},
    "v6e": {n: f"v6e:{g}" for n, g in _GRID_2D.items()},
    "v4": {4: "v4:2x2x1", 8: "v4:2x2x2", 16: "v4:2x2x4", 32: "v4:2x4x4", 64: "v4:4x4x4",
           128: "v4:4x4x8", 256: "v4:4x8x8"},
}
_TOPOLOGY_OPTIONS = {"v4": {"chip_config_name": "megacore"}}

ESTIMATE_NOTE = ("memory from XLA's compile of the same sharded programs for {platform} "
                 "devices; on TPU, layouts (tiling/padding), fusion and bf16 handling differ, "
                 "so treat these numbers as an estimate of the TPU ones")


# ----------------------------------------------------------------------------- architecture
def resolve_architecture(name_or_path: str, *, dtype: str = "float32",
                         param_dtype: str | None = None, remat_policy: str = "none",
                         scan_layers: bool = True):
    """``(DecoderConfig, how it was found)`` for ``model.name``, without reading weights.

    A local checkpoint directory with ``config.json`` wins; then an exact preset name; then
    the preset whose name is contained in the path's last component (case-insensitive,
    longest match: ``/path/to/Qwen2.5-Math-1.5B-Instruct`` -> ``qwen2.5-math-1.5b-instruct``).
    """
    kw = dict(dtype=dtype, param_dtype=param_dtype, remat_policy=remat_policy,
              scan_layers=scan_layers)
    path = Path(str(name_or_path)).expanduser()
    if (path / "config.json").is_file():
        return architecture_config(path, **kw), f"{path / 'config.json'}"
    if str(name_or_path).lower() in PRESETS:
        return architecture_config(str(name_or_path), **kw), \
            f"built-in preset {str(name_or_path).lower()!r}"
    preset = match_preset(name_or_path)
    if preset is None:
        raise ValueError(
            f"model.name={str(name_or_path)!r}: not a local checkpoint directory with "
            f"config.json, and no architecture preset name is contained in "
            f"{path.name!r}; presets: {', '.join(preset_names())} (or point model.name at a "
            "directory holding the checkpoint's config.json; weights are not needed)")
    why = "has no config.json" if path.is_dir() else "does not exist here"
    return architecture_config(preset, **kw), \
        f"built-in preset {preset!r}, matched by name ({str(path)!r} {why})"


# ----------------------------------------------------------------------------- helpers
def _count(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def _with_shardings(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        tree, shardings)


def _bytes_per_device(tree) -> int:
    """Bytes of one device's shards of an abstract tree whose leaves carry shardings."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def _compile(jitted, args, *, platform: str, lowered=None) -> dict:
    """Lower (unless ``lowered`` is given) + compile; per-device memory (GiB) from
    ``memory_analysis()`` and timings."""
    t0 = time.perf_counter()
    lowered = jitted.lower(*args) if lowered is None else lowered
    t1, cpu1 = time.perf_counter(), time.process_time()
    options = _CPU_COMPILER_OPTIONS if platform == "cpu" else None
    compiled = lowered.compile(compiler_options=options) if options else lowered.compile()
    # CPU seconds of this process (all threads): on a shared machine, what the compile cost
    t2, cpu2 = time.perf_counter(), time.process_time()
    ma = compiled.memory_analysis()
    if ma is None:
        raise RuntimeError(f"the {platform} backend reports no memory analysis for compiled "
                           "programs; run the dry run on CPU (fake devices) or TPU")
    stats = {"argument": ma.argument_size_in_bytes, "output": ma.output_size_in_bytes,
             "alias": ma.alias_size_in_bytes, "temp": ma.temp_size_in_bytes,
             "generated_code": ma.generated_code_size_in_bytes}
    # live at once: arguments + outputs (minus outputs written into donated arguments)
    # + temporaries + the program itself
    stats["total"] = (stats["argument"] + stats["output"] - stats["alias"] + stats["temp"]
                      + stats["generated_code"])
    out = {k: v / GIB for k, v in stats.items()}
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    text = compiled.as_text()
    loops = hlo.decode_loop_collectives(text)
    out.update(lower_s=t1 - t0, compile_s=t2 - t1, compile_cpu_s=cpu2 - cpu1,
               gflops=float(cost.get("flops", float("nan"))) / 1e9,
               collective_mib=hlo.summary(text)["collective_bytes"] / 2**20,
               # per decoded token: read for sampler programs only (the TPU compiler's text
               # has no trip counts, so there every layer scan looks data-dependent too)
               loop_collective_mib=loops["bytes"] / 2**20, loops=loops["loops"])
    return out


def hbm_budget(hbm_gib: float | None = None, tpu: str | None = None,
               hint: str = "") -> tuple[float, str]:
    """``(GiB per device, where it came from)``: explicit ``hbm_gib``, else the TPU generation
    ``tpu`` (or one named in ``hint``, e.g. the config's file name), else v5e."""
    if hbm_gib is not None:
        return float(hbm_gib), "given"
    if tpu is None:
        tpu = _generation_in(hint)
        if tpu is None:
            return HBM_GIB[DEFAULT_TPU], (f"TPU {DEFAULT_TPU} (default; set dry_run.hbm_gib=<GiB> "
                                          "or dry_run.tpu=<generation>)")
        return HBM_GIB[tpu], f"TPU {tpu} (from {Path(hint).name!r})"
    key = tpu.lower()
    if key not in HBM_GIB:
        raise ValueError(f"unknown TPU generation {tpu!r}; known: {sorted(HBM_GIB)} "
                         "(or give dry_run.hbm_gib=<GiB>)")
    return HBM_GIB[key], f"TPU {key}"


# ----------------------------------------------------------------------------- dry run
@dataclasses.dataclass
class _AbstractRun:
    """A run's programs built from shapes alone (:func:`build_programs` on an
    ``nnx.eval_shape`` model) and what the report needs to know about them."""

    config: Any
    programs: Programs
    arch: Any
    arch_source: str
    mesh_shape: tuple[int, int, int]
    devices: list
    state: TrainState  # abstract, with shardings
    teacher: Any  # abstract teacher weights (method.init_teacher), or None
    params_gib: float  # per device
    opt_gib: float
    copies_gib: float  # teacher / reference weight copies
    n_params: int

    @property
    def platform(self) -> str:
        return self.devices[0].platform


def _abstract_run(config, devices) -> _AbstractRun:
    mesh_shape = check_mesh(config, len(devices))
    mesh = make_mesh(*mesh_shape, devices=devices)
    arch, arch_source = resolve_architecture(config.model.name, dtype=config.model.dtype,
                                             param_dtype=config.model.param_dtype,
                                             remat_policy=config.model.remat_policy,
                                             scan_layers=config.model.scan_layers)
    # shapes only: every parameter is a ShapeDtypeStruct, nothing is allocated
    model = nnx.eval_shape(lambda: Decoder(arch, rngs=nnx.Rngs(0)))
    method = config.make_method()
    programs = build_programs(model, mesh, step=config.step_config(method),
                              optimizer=make_optimizer(config.optimizer),
                              batch=config.abstract_batch(mesh, method),
                              pad_id=resolve_pad_id(arch), stop_ids=arch.eos_token_ids,
                              reshard_weights=config.rollout.reshard_weights)
    params = nnx.state(model, nnx.Param)
    state = _with_shardings(jax.eval_shape(lambda: TrainState(
        params, programs.optimizer.init(params), jnp.zeros((), jnp.int32))),
        programs.state_sharding)
    teacher = jax.eval_shape(method.init_teacher, state.params)
    if teacher is not None:
        teacher = _with_shardings(teacher, programs.state_sharding.params)
    params_gib = _bytes_per_device(state.params) / GIB
    copies = (0 if teacher is None else params_gib) + \
        (params_gib if config.policy.kl_beta > 0 else 0)
    return _AbstractRun(config, programs, arch, arch_source, mesh_shape, list(devices), state,
                        teacher, params_gib, _bytes_per_device(state.opt_state) / GIB, copies,
                        sum(math.prod(x.shape) for x in jax.tree.leaves(params)))


def _compile_programs(run: _AbstractRun, *, sampler: bool) -> dict[str, dict]:
    """Lower and compile each program the trainer runs; memory per device (GiB)."""
    config, programs, platform = run.config, run.programs, run.platform
    shapes, method = config.shapes(), programs.method
    resident = run.opt_gib + run.copies_gib  # outside the sampling and scoring programs
    out: dict[str, dict] = {}
    if sampler:  # the largest KV cache of the rollout and the method's own sampling passes
        r = config.rollout
        passes = {"rollout": (shapes.prompt, SamplingConfig(
            max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
            top_k=r.top_k))}
        passes.update(method.sampling_passes(config))
        name, (width, sampling) = max(passes.items(), key=lambda kv: bucket_length(kv[1][0])
                                      + bucket_length(kv[1][1].max_new_tokens))
        out["sampler"] = _compile_lowered(
            programs.lower_sample(shapes.rows, width, sampling), platform,
            f"{name} sampler ({shapes.rows} x {bucket_length(width)}+"
            f"{bucket_length(sampling.max_new_tokens)})", resident)
    rows = NamedSharding(programs.mesh, PartitionSpec(("data", "fsdp"), None))

    def seq(width):
        return jax.ShapeDtypeStruct((shapes.rows, width), jnp.int32, sharding=rows)

    resp = seq(shapes.response)
    ref_txt = " (also the reference pass)" if config.policy.kl_beta > 0 else ""
    out["score_old"] = _compile(programs.score_old, (run.state.params, seq(shapes.prompt),
                                                     seq(shapes.prompt), resp, resp),
                                platform=platform)
    out["score_old"].update(label=f"scorer: old logprobs{ref_txt} ({shapes.rows} x "
                                  f"{shapes.prompt}+{shapes.response})", resident=resident)
    for name, tokens in method.scoring_passes(config).items():
        width = max(bucket_length(tokens), shapes.prompt)
        out[f"score_{name}"] = _compile(programs.score, (run.state.params, seq(width),
                                                         seq(width), resp, resp),
                                        platform=platform)
        out[f"score_{name}"].update(label=f"scorer: {name} logprobs ({shapes.rows} x "
                                          f"{width}+{shapes.response})", resident=resident)
    # the update step takes the teacher weights as an argument; a reference copy stays
    out["update"] = _compile(programs.update.jitted,
                             (run.state, programs.batch, run.teacher, programs.update.other),
                             platform=platform)
    out["update"].update(label=f"update step ({config.method}, {config.micro_batches} micro)",
                         resident=run.params_gib if config.policy.kl_beta > 0 else 0.0)
    for p in out.values():
        p["peak"] = p["total"] + p["resident"]
    return out


def _compile_lowered(lowered, platform: str, label: str, resident: float) -> dict:
    out = _compile(None, (), platform=platform, lowered=lowered)
    out.update(label=label, resident=resident)
    return out


def _print_header(run: _AbstractRun, config_name: str, compile_only: bool, out) -> None:
    config, arch, shapes = run.config, run.arch, run.config.shapes()
    n_params = run.n_params
    device = run.devices[0]
    kind = ("fake CPU" if run.platform == "cpu" else
            f"{device.device_kind} (compile-only topology, libtpu)" if compile_only
            else device.device_kind)
    data, fsdp, tensor = run.mesh_shape
    fields = ", ".join(run.programs.batch.present)
    out(f"amrsd_jax dry run{' of ' + config_name if config_name else ''}: ahead-of-time "
        "compile from shapes only (no weights are allocated)")
    out(f"  model    {config.model.name}")
    out(f"           architecture: {run.arch_source}")
    out(f"           {arch.model_type}, {n_params / 1e9:.3f}B params, {arch.num_layers} layers,"
        f" hidden {arch.hidden_size}, vocab {arch.vocab_size}; params {arch.param_dtype}, "
        f"compute {arch.dtype}, remat {arch.remat_policy}, "
        f"{'scanned' if arch.scan_layers else 'looped'} layers")
    out(f"  method   {config.method} (update batch: {fields})")
    out(f"  mesh     data={data} x fsdp={fsdp} x tensor={tensor} = {len(run.devices)} {kind} "
        "devices")
    rows_dev = shapes.micro_rows // (data * fsdp)
    out(f"  batch    {shapes.rows} rollouts = {config.rollout.prompts_per_step} prompts x "
        f"{config.rollout.group_size}; micro_batches={config.micro_batches} -> "
        f"{shapes.micro_rows} rows per micro-batch ({rows_dev} per device); prompt "
        f"{shapes.prompt}, response {shapes.response}, teacher prompt {shapes.teacher_prompt}"
        f" tokens; vocab_chunk={config.vocab_chunk}")


def _print_table(run: _AbstractRun, programs: dict, budget: float, budget_source: str,
                 wall: float, out) -> tuple[str, float]:
    peak_name = max(programs, key=lambda k: programs[k]["peak"])
    peak = programs[peak_name]["peak"]
    unit, scale = ("GiB", 1.0) if peak >= 0.5 else ("MiB", 1024.0)  # MiB for tiny models
    out("")
    out(f"  {'per device, ' + unit:<44}{'args':>8}{'out':>8}{'alias':>8}{'temp':>8}"
        f"{'program':>9}{'+state':>8}{'=peak':>8}{'compile':>9}{'cpu':>8}{'GFLOP':>9}"
        f"{'coll MiB':>10}{'/token':>9}")
    for name, p in programs.items():
        v = {k: p[k] * scale for k in ("argument", "output", "alias", "temp", "total",
                                       "resident", "peak")}
        per_token = f"{p['loop_collective_mib']:>9.1f}" if name == "sampler" else f"{'-':>9}"
        out(f"  {p['label']:<44.44}{v['argument']:>8.2f}{v['output']:>8.2f}{v['alias']:>8.2f}"
            f"{v['temp']:>8.2f}{v['total']:>9.2f}{v['resident']:>8.2f}{v['peak']:>8.2f}"
            f"{p['lower_s'] + p['compile_s']:>8.1f}s{p['compile_cpu_s']:>7.1f}s"
            f"{p['gflops']:>9.1f}"
            f"{p['collective_mib']:>10.1f}{per_token}")
    out("  (program = args + out - alias + temp + code; +state = what stays on the device "
        "outside the program's arguments: Adam moments while sampling/scoring, teacher / "
        "reference weight copies; compile = lowering + compiling (wall), cpu = the compiler's "
        "CPU seconds (all threads: on a shared machine, the number to compare); GFLOP and "
        "collective MiB per device, each collective counted once (loops not multiplied); "
        "/token = the sampler's collective MiB per decoded token)")
    out("")
    copies = (f", teacher/reference weight copies {run.copies_gib * scale:.2f} {unit}"
              if run.copies_gib else "")
    out(f"  state per device: params {run.params_gib * scale:.2f} {unit}, optimizer state "
        f"{run.opt_gib * scale:.2f} {unit}{copies}")
    out(f"  peak per device: {peak * scale:.2f} {unit} ({programs[peak_name]['label']})")
    verdict = (f"FITS, {budget - peak:.2f} GiB to spare" if peak <= budget
               else f"DOES NOT FIT, over by {peak - budget:.2f} GiB")
    if peak > budget and run.platform == "cpu":
        # XLA:CPU's memory is an upper bound of the TPU's: over budget is not conclusive
        verdict += (" on the CPU upper-bound estimate (not conclusive: compile for the TPU "
                    "with pip install 'amrsd_jax[tpu-aot]' and dry_run.target=tpu)")
    out(f"  HBM budget: {budget:.1f} GiB per device [{budget_source}] -> {verdict}")
    _print_notes(run, out)
    out(f"  dry run wall time {wall:.1f}s")
    return peak_name, peak


def _print_notes(run: _AbstractRun, out) -> None:
    if run.platform == "cpu":
        out("  note: " + ESTIMATE_NOTE.format(platform="CPU"))
        if run.arch.remat_policy != "none":
            out("  note: XLA:CPU mostly ignores rematerialisation (jax.checkpoint / "
                "model.remat_policy) and computes bf16 in f32, so the update step's CPU temp memory "
                "is a loose upper bound, often several times the TPU compiler's; install "
                "libtpu for the TPU's own numbers (dry_run.target=tpu; v4 / v5e / v6e)")
    else:
        out(f"  note: compiled by the {run.devices[0].device_kind} compiler (XLA's memory "
            "analysis of the real program); runtime overheads (allocator fragmentation, "
            "collectives' buffers) are not included")


def dry_run(config, *, devices=None, hbm_gib: float | None = None, tpu: str | None = None,
            sampler: bool = True, config_name: str = "", compile_only: bool = False,
            out: Callable[[str], Any] = print) -> dict:
    """Compile the run's programs from shapes alone and report per-device memory.

    Args:
      config: a :class:`~amrsd_jax.train.config.TrainConfig`.
      devices: the devices of the mesh (default: all of ``jax.devices()``); their number must
        match ``config.mesh`` (:func:`~amrsd_jax.train.config.check_mesh`, a ``ConfigError``).
      hbm_gib / tpu: the per-device memory budget (see :func:`hbm_budget`); ``config_name``
        (the YAML path) is a hint for the TPU generation and is printed.
      sampler: also compile the rollout/reflection sampler (its KV cache).
      compile_only: ``devices`` are a compile-only TPU topology (:func:`tpu_topology_devices`).
      out: where the report's lines go.

    Returns a JSON-able dict: model, mesh, shapes, per-program memory (GiB per device),
    resident state, per-phase peaks, budget and ``fits``.
    """
    t_start = time.perf_counter()
    run = _abstract_run(config, list(devices if devices is not None else jax.devices()))
    budget, budget_source = hbm_budget(hbm_gib, tpu, config_name)
    _print_header(run, config_name, compile_only, out)
    out("  compiling ...")
    programs = _compile_programs(run, sampler=sampler)
    wall = time.perf_counter() - t_start
    peak_name, peak = _print_table(run, programs, budget, budget_source, wall, out)
    arch = run.arch
    return {
        "config": config_name or None,
        "model": {"name": config.model.name, "architecture": run.arch_source,
                  "model_type": arch.model_type, "params": run.n_params,
                  "num_layers": arch.num_layers, "param_dtype": arch.param_dtype,
                  "dtype": arch.dtype, "remat_policy": arch.remat_policy,
                  "scan_layers": arch.scan_layers},
        "method": config.method,
        "mesh": dict(zip(("data", "fsdp", "tensor"), run.mesh_shape)),
        "devices": len(run.devices), "platform": run.platform,
        "shapes": dataclasses.asdict(config.shapes()),
        "state_gib_per_device": {"params": run.params_gib, "optimizer": run.opt_gib,
                                 "extra_weight_copies": run.copies_gib},
        "programs": programs, "peak_gib": peak, "peak_program": peak_name,
        "hbm_gib": budget, "hbm_source": budget_source, "fits": peak <= budget,
        "margin_gib": budget - peak, "estimate": run.platform == "cpu",
        "device_kind": run.devices[0].device_kind, "wall_s": wall,
    }

# ----------------------------------------------------------------------------- devices
def tpu_topology_devices(tpu: str | None, n: int):
    """Compile-only devices of a TPU slice with ``n`` chips (``libtpu`` needed, no TPU), or
    ``None`` when libtpu is missing or has no such topology of ``tpu``."""
    name = _TPU_TOPOLOGIES.get((tpu or "").lower(), {}).get(n)
    if name is None or importlib.util.find_spec("libtpu") is None:
        return None
    devices = list(topologies.get_topology_desc(
        topology_name=name, platform="tpu", **_TOPOLOGY_OPTIONS.get(tpu.lower(), {})).devices)
    return devices if len(devices) == n else None


def _with_device_count(xla_flags: str, n: int) -> str:
    kept = [f for f in xla_flags.split() if not f.startswith(_COUNT_FLAG)]
    return " ".join(kept + [f"{_COUNT_FLAG}={n}"])


def ensure_fake_devices(n: int) -> None:
    """Make sure JAX has at least ``n`` devices.

    Before JAX's backend starts this sets ``XLA_FLAGS=--xla_force_host_platform_device_count=n``
    (CPU); afterwards that flag has no effect, so too few devices is an error saying how to
    get them.
    """
    if not xla_bridge.backends_are_initialized():
        os.environ["XLA_FLAGS"] = _with_device_count(os.environ.get("XLA_FLAGS", ""), n)
    have = jax.device_count()
    if have < n:
        raise RuntimeError(
            f"the dry run needs {n} devices but JAX has {have} ({jax.devices()[0].platform}); "
            f"fake CPU devices must be requested before JAX starts: run with "
            f"XLA_FLAGS={_COUNT_FLAG}={n} JAX_PLATFORMS=cpu, or call "
            "amrsd_jax.train.aot.main_dry_run, which re-executes itself with them")


def needed_devices(config, devices: int | None = None) -> int:
    """Devices the configured mesh needs (``mesh.data=-1`` counts as 1 unless ``devices``)."""
    if devices is not None:
        return int(devices)
    m = config.mesh
    return (m.data if m.data > 0 else 1) * m.fsdp * m.tensor


def split_options(overrides: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """Separate ``dry_run.<option>=value`` overrides from the TrainConfig ones."""
    rest, opts = [], {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and key.strip().startswith("dry_run."):
            name = key.strip()[len("dry_run."):]
            if name not in _OPTION_KEYS:
                raise ConfigError(f"unknown dry-run option {key.strip()!r}; options: "
                                  + ", ".join(f"dry_run.{k}" for k in _OPTION_KEYS))
            opts[name] = value
        else:
            rest.append(item)
    return rest, opts


def reexec_command(config_path, overrides: Sequence[str], n: int,
                   env: dict | None = None) -> tuple[list[str], dict]:
    """``(argv, env)`` that re-runs the dry run in a fresh process with ``n`` CPU devices."""
    env = dict(os.environ if env is None else env)
    env["XLA_FLAGS"] = _with_device_count(env.get("XLA_FLAGS", ""), n)
    env["JAX_PLATFORMS"] = "cpu"
    env[_CHILD_ENV] = "1"
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(
        os.pathsep) if p and p != root])
    argv = [sys.executable, "-m", "amrsd_jax.train.aot"]
    if config_path is not None:
        argv += ["--config", str(config_path)]
    return argv + list(overrides), env


def main_dry_run(config_path, overrides: Sequence[str] = (), *, hbm_gib: float | None = None,
                 tpu: str | None = None, sampler: bool = True, json_path: str | None = None,
                 target: str = "auto", out: Callable[[str], Any] = print) -> int:
    """Entry point of ``run.py train --dry-run``: load the config, get the devices (re-running
    itself with fake CPU devices if this process has too few), :func:`dry_run`, print.

    ``target``: ``tpu`` compiles with libtpu for a compile-only TPU topology (v4 / v5e / v6e),
    ``cpu`` on fake CPU devices, ``auto`` (default) the former when possible.

    Returns 0 if the run fits the HBM budget (or only the CPU upper-bound estimate is over
    it), 1 if it does not fit on the TPU compiler's numbers, 2 for a configuration error.
    """
    try:
        rest, opts = split_options(overrides)
        config = load_train_config(config_path, rest)
        hbm_gib = float(opts["hbm_gib"]) if "hbm_gib" in opts else hbm_gib
        tpu = opts.get("tpu", tpu)
        sampler = (opts["sampler"].lower() not in ("0", "false", "no", "off")
                   if "sampler" in opts else sampler)
        json_path = opts.get("json", json_path)
        target = opts.get("target", target)
        if target not in ("auto", "cpu", "tpu"):
            raise ValueError(f"target must be auto, cpu or tpu, got {target!r}")
        n = needed_devices(config, opts.get("devices"))
        hbm_budget(hbm_gib, tpu)  # validate the TPU name before compiling anything
        tpu_devices = _tpu_devices(target, tpu or _generation_in(str(config_path or "")), n,
                                   out)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if tpu_devices is not None:
        return _report(config, tpu_devices, config_path, hbm_gib, tpu, sampler, json_path, out,
                       compile_only=True)

    if not xla_bridge.backends_are_initialized():
        flags = os.environ.get("XLA_FLAGS", "")
        m = re.search(_COUNT_FLAG + r"=(\d+)", flags)
        if m is None or int(m.group(1)) < n:
            os.environ["XLA_FLAGS"] = _with_device_count(flags, n)
    devices = jax.devices()
    if len(devices) < n:
        if os.environ.get(_CHILD_ENV):
            print(f"error: the dry run needs {n} devices, the re-executed process has "
                  f"{len(devices)}", file=sys.stderr)
            return 2
        argv, env = reexec_command(config_path, list(overrides) + _option_overrides(
            hbm_gib, tpu, sampler, json_path) + ["dry_run.target=cpu"], n)
        out(f"[dry run] this process has {len(devices)} {devices[0].platform} device(s); "
            f"re-running with {n} fake CPU devices ({_COUNT_FLAG}={n})")
        return subprocess.run(argv, env=env, check=False).returncode
    return _report(config, devices[:n], config_path, hbm_gib, tpu, sampler, json_path, out)


def _tpu_devices(target: str, generation: str | None, n: int, out):
    """Compile-only TPU devices for ``target`` tpu / auto (``None``: use CPU devices); a
    ``ValueError`` when ``target`` is tpu and they cannot be made."""
    if target == "cpu":
        return None
    devices = None
    try:
        devices = tpu_topology_devices(generation, n)
    except Exception as e:  # noqa: BLE001 - libtpu present but unusable: say so
        if target == "tpu":
            raise ValueError(f"libtpu could not make a {generation} topology: {e}")
        out(f"[dry run] libtpu could not make a {generation} topology ({e}); using fake CPU "
            "devices")
    if target == "tpu" and devices is None:
        raise ValueError(f"dry_run.target=tpu needs the libtpu package and a TPU generation among "
                         f"{sorted(_TPU_TOPOLOGIES)} with a device count among "
                         f"{sorted(_TPU_TOPOLOGIES.get(generation or '', _GRID_2D))} "
                         f"(got {generation!r}, {n} devices)")
    return devices


def _generation_in(name: str) -> str | None:
    m = re.search(r"(v5e|v5p|v6e|v4)", name.lower())
    return m.group(1) if m else None


def _report(config, devices, config_path, hbm_gib, tpu, sampler, json_path, out, *,
            compile_only: bool = False) -> int:
    try:
        report = dry_run(config, devices=devices, hbm_gib=hbm_gib, tpu=tpu, sampler=sampler,
                         config_name=str(config_path or ""), compile_only=compile_only,
                         out=out)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=2))
        out(f"  wrote {json_path}")
    return 0 if report["fits"] or report["estimate"] else 1


def _option_overrides(hbm_gib, tpu, sampler, json_path) -> list[str]:
    """Command-line options as ``dry_run.*`` overrides (to hand to the re-executed child)."""
    opts = []
    if hbm_gib is not None:
        opts.append(f"dry_run.hbm_gib={hbm_gib}")
    if tpu is not None:
        opts.append(f"dry_run.tpu={tpu}")
    if not sampler:
        opts.append("dry_run.sampler=false")
    if json_path:
        opts.append(f"dry_run.json={json_path}")
    return opts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m amrsd_jax.train.aot",
        description="AOT memory check of a training config (no weights, fake CPU devices)")
    parser.add_argument("--config", default=None, help="training YAML (default: built-in "
                                                       "TrainConfig defaults)")
    parser.add_argument("--hbm-gib", type=float, default=None,
                        help="per-device HBM budget in GiB (default: from --tpu)")
    parser.add_argument("--tpu", default=None, choices=sorted(HBM_GIB),
                        help="TPU generation for the budget (default: named in the config's "
                             f"file name, else {DEFAULT_TPU})")
    parser.add_argument("--target", default="auto", choices=("auto", "cpu", "tpu"),
                        help="tpu: TPU compiler, compile-only topology (needs libtpu; v4/v5e/v6e); "
                             "cpu: fake CPU devices; auto: tpu when possible")
    parser.add_argument("--json", default=None, help="also write the report as JSON here")
    parser.add_argument("--no-sampler", action="store_true",
                        help="skip compiling the rollout sampler")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    return main_dry_run(args.config, args.overrides, hbm_gib=args.hbm_gib, tpu=args.tpu,
                        sampler=not args.no_sampler, json_path=args.json, target=args.target)


if __name__ == "__main__":
    sys.exit(main())
