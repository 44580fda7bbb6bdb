"""``python run.py bench step``: throughput and model FLOP utilisation of the update step.

Everything runs in one process on a 1x1x1 mesh (``jax.devices()[:1]``) with the bundled model
in fp32. The batch is synthetic: ``B = prompts * group_size`` rows of random token ids with
full prompt and response masks and 0/1 rewards in which every group is mixed (the content of
the tokens does not change the cost). Four phases are timed:

- ``old_scoring``: the old-policy pass both methods need, the jitted
  :func:`~amrsd_jax.scoring.response_logprobs` forward of :func:`~amrsd_jax.scoring.make_scorer`
  on the student sequences ``[B, P + N]``, one call per micro-batch of rows, no gradient;
- ``teacher_scoring``: the same function on AMR-SD's teacher sequences ``[B, C + P + N]``
  (a ``C = TEACHER_CONTEXT_TOKENS`` context prefix before the prompt, the same responses);
- ``grpo_step``: the jitted update step (:func:`~amrsd_jax.programs.build_programs`) of
  method ``grpo``: forward + backward over ``micro_batches`` micro-batches and AdamW;
- ``amr_sd_step``: the same step for ``amr_sd`` (``teacher_logprobs`` in the batch).

Each phase runs once as a warm-up (compilation + first run, reported on its own), then
``repeats`` timed runs whose median is reported. Model FLOP utilisation (MFU) divides the
achieved FLOP/s (:data:`FLOP_FORMULA`) by the measured fp32 peak of one large jitted matmul.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..batch import abstract_batch, make_batch
from ..methods import make_method
from ..models import load_model
from ..programs import build_programs
from ..rollout.sampler import resolve_pad_id
from ..sharding import shard_batch, single_device_mesh
from ..update import OptimizerConfig, StepConfig, make_optimizer
from .harness import Timing, format_table, measure_matmul_gflops, progress, time_runs, write_results

#: Length ``C`` of the random context prefix standing in for AMR-SD's self-written reflection.
TEACHER_CONTEXT_TOKENS = 32

FLOP_FORMULA = (
    "update step: 6 * num_params * B * (P + N) (forward 2 + backward 4 FLOPs per parameter "
    "per token); scoring pass: 2 * num_params * B * T with T = P + N (old policy) or "
    "C + P + N (teacher); num_params = model.config.num_params(), the tied embedding counted "
    "once as the vocabulary projection. Approximate: the vocabulary projection is counted at "
    "every position though only the N response positions are projected (an overcount of "
    "6 * vocab * hidden * B * P per step), and attention score/value FLOPs (~12 * layers * "
    "hidden * T per token, fwd + bwd) are left out; at these lengths the two nearly cancel.")


#: Timed phases, in order, and their labels in the printed table.
PHASES = {"old_scoring": "old-policy scoring", "teacher_scoring": "teacher scoring",
          "grpo_step": "GRPO update step", "amr_sd_step": "AMR-SD update step"}


def make_synthetic_batch(num_prompts: int, group_size: int, prompt_tokens: int,
                         response_tokens: int, context_tokens: int, vocab_size: int,
                         seed: int = 0) -> dict[str, np.ndarray]:
    """Host arrays of a synthetic rollout batch (``B = num_prompts * group_size``).

    Returns ``prompt_ids, prompt_mask [B, P]``, ``response_ids, response_mask [B, N]``
    (all masks 1), ``rewards [B]`` (0/1, every group holds both) and the teacher prompt
    ``teacher_prompt_ids, teacher_prompt_mask [B, C + P]`` (random context, then the prompt).
    """
    rng = np.random.default_rng(seed)
    b = num_prompts * group_size
    prompt_ids = rng.integers(0, vocab_size, (b, prompt_tokens), dtype=np.int32)
    context_ids = rng.integers(0, vocab_size, (b, context_tokens), dtype=np.int32)
    rewards = rng.integers(0, 2, (num_prompts, group_size)).astype(np.float32)
    rewards[:, 0], rewards[:, 1] = 1.0, 0.0  # every group mixed: no zero-variance group
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": np.ones((b, prompt_tokens), np.int32),
        "response_ids": rng.integers(0, vocab_size, (b, response_tokens), dtype=np.int32),
        "response_mask": np.ones((b, response_tokens), np.int32),
        "rewards": rewards.reshape(-1),
        "teacher_prompt_ids": np.concatenate([context_ids, prompt_ids], axis=1),
        "teacher_prompt_mask": np.ones((b, context_tokens + prompt_tokens), np.int32),
    }


def score_in_chunks(score, params, chunks):
    """Response log-probs ``[B, N]`` from one ``score`` call per chunk of rows.

    ``score`` is a :func:`~amrsd_jax.scoring.make_scorer` function; ``chunks`` a list of
    ``(prompt_ids, prompt_mask, response_ids, response_mask)`` already on the mesh.
    """
    return jnp.concatenate([score(params, *chunk)[0] for chunk in chunks], axis=0)


def _phase_stats(timing: Timing, flops: float, peak_gflops: float, response_tokens: int,
                 total_tokens: int) -> dict:
    median = timing.median_s
    return {**timing.to_dict(), "response_tokens": response_tokens, "total_tokens": total_tokens,
            "response_tokens_per_s": response_tokens / median,
            "total_tokens_per_s": total_tokens / median,
            "gflop": flops / 1e9, "achieved_gflops": flops / median / 1e9,
            "mfu": flops / median / 1e9 / peak_gflops}


def _programs(model, mesh, method_name: str, group_size: int, micro: int, optimizer, shapes):
    """The trainer's programs (:func:`~amrsd_jax.programs.build_programs`) for a method."""
    method = make_method(method_name)
    rows, prompt, response = shapes
    return build_programs(
        model, mesh, step=StepConfig(method=method, group_size=group_size, micro_batches=micro),
        optimizer=optimizer,
        batch=abstract_batch(method.fields, rows=rows, prompt=prompt, response=response),
        pad_id=resolve_pad_id(model.config), stop_ids=model.config.eos_token_ids)


def main(args) -> int:
    g, k = args.group_size, args.micro_batches
    b, p, n = args.prompts * g, args.prompt_tokens, args.response_tokens
    c = TEACHER_CONTEXT_TOKENS
    if args.repeats < 1 or k < 1 or b % k:
        raise SystemExit(f"need --repeats >= 1 and --micro-batches >= 1 dividing the "
                         f"--prompts x --group-size = {b} rows (got {args.repeats}, {k})")
    rows = b // k
    model, _ = load_model(args.model, dtype="float32")
    cfg_m = model.config
    num_params = cfg_m.num_params()
    mesh = single_device_mesh()
    host = make_synthetic_batch(args.prompts, g, p, n, c, cfg_m.vocab_size)
    progress("step", f"{args.model} ({num_params / 1e6:.1f}M params, fp32): {args.prompts} "
             f"prompts x {g} rollouts = {b} rows, prompt {p} + response {n} tokens (teacher "
             f"context +{c}), {k} micro-batches of {rows} rows, {args.repeats} timed runs per "
             "phase")

    optimizer = make_optimizer(OptimizerConfig())
    grpo = _programs(model, mesh, "grpo", g, k, optimizer, (b, p, n))
    amr = _programs(model, mesh, "amr_sd", g, k, optimizer, (b, p, n))
    score = grpo.score
    # one train state threads through both steps (the state is donated by each call)
    state = grpo.init_state()
    del model  # its parameter buffers may be the state's, which the first step donates

    def chunks(ids_key: str, mask_key: str) -> list[tuple]:
        """The scorer's arguments for each micro-batch of rows, placed on the mesh."""
        keys = (ids_key, mask_key, "response_ids", "response_mask")
        return [tuple(shard_batch(host[key][i:i + rows], mesh) for key in keys)
                for i in range(0, b, rows)]

    scored, last_metrics, timings = {}, {}, {}

    def scoring(name: str, chunk_list: list[tuple]):
        def run():
            scored[name] = score_in_chunks(score, state.params, chunk_list).block_until_ready()
        return run

    def stepping(step_fn, batch):
        def run():
            nonlocal state
            state, _, metrics = step_fn(state, batch)
            last_metrics.update(jax.block_until_ready(metrics))
            jax.block_until_ready(state)
        return run

    def timed(name: str, fn) -> None:
        progress("step", f"{len(timings) + 1}/{len(PHASES)} {PHASES[name]}: warm-up "
                 f"(compile + run) + {args.repeats} timed runs ...")
        timings[name] = time_runs(fn, args.repeats)
        progress("step", f"    first {timings[name].first_s:.1f}s, "
                 f"median {timings[name].median_s:.1f}s")

    timed("old_scoring", scoring("old", chunks("prompt_ids", "prompt_mask")))
    timed("teacher_scoring",
          scoring("teacher", chunks("teacher_prompt_ids", "teacher_prompt_mask")))
    student = {key: shard_batch(host[key], mesh) for key in
               ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "rewards")}
    old = dict(old_logprobs=scored["old"], sampler_logprobs=scored["old"])
    timed("grpo_step", stepping(grpo.update, make_batch(**student, **old)))
    timed("amr_sd_step", stepping(amr.update, make_batch(**student, **old,
                                                         teacher_logprobs=scored["teacher"])))
    skipped = int(jax.device_get(last_metrics["skipped_total"]))

    progress("step", "measuring the matmul peak ...")
    peak = measure_matmul_gflops(2048, cfg_m.hidden_size, 8 * cfg_m.intermediate_size)
    student_tokens, teacher_tokens = b * (p + n), b * (c + p + n)
    flops = {"old_scoring": 2 * num_params * student_tokens,
             "teacher_scoring": 2 * num_params * teacher_tokens,
             "grpo_step": 6 * num_params * student_tokens,
             "amr_sd_step": 6 * num_params * student_tokens}
    results = {
        "model": str(args.model), "num_params": num_params, "dtype": "float32",
        "prompts": args.prompts, "group_size": g, "rows": b, "prompt_tokens": p,
        "response_tokens": n, "teacher_context_tokens": c, "micro_batches": k,
        "repeats": args.repeats, "mesh": "1x1x1 (data, fsdp, tensor) on jax.devices()[:1]",
        "flop_formula": FLOP_FORMULA,
        "matmul_peak": {"shape": [2048, cfg_m.hidden_size, 8 * cfg_m.intermediate_size],
                        "gflops": peak},
        "phases": {name: _phase_stats(timings[name], flops[name], peak, b * n,
                                      teacher_tokens if name == "teacher_scoring"
                                      else student_tokens)
                   for name in PHASES},
        "skipped_updates": skipped,
    }
    med = {name: r["median_s"] for name, r in results["phases"].items()}
    results["ratios"] = {
        "amr_sd_step_over_grpo_step": med["amr_sd_step"] / med["grpo_step"],
        "teacher_scoring_plus_amr_sd_step_over_grpo_step":
            (med["teacher_scoring"] + med["amr_sd_step"]) / med["grpo_step"],
        "amr_sd_iteration_over_grpo_iteration":
            (med["old_scoring"] + med["teacher_scoring"] + med["amr_sd_step"])
            / (med["old_scoring"] + med["grpo_step"]),
    }

    table = [("phase", "median s", "first s", "resp tok/s", "total tok/s", "GFLOP/s", "MFU",
              "runs (s)")]
    for name, label in PHASES.items():
        r = results["phases"][name]
        table.append((label, f"{r['median_s']:.2f}", f"{r['first_run_s']:.1f}",
                      f"{r['response_tokens_per_s']:.0f}", f"{r['total_tokens_per_s']:.0f}",
                      f"{r['achieved_gflops']:.1f}", f"{100 * r['mfu']:.1f}%",
                      ", ".join(f"{t:.2f}" for t in r["runs_s"])))
    print(format_table(table))
    ratios = results["ratios"]
    print(f"amr_sd step / grpo step: {ratios['amr_sd_step_over_grpo_step']:.3f}x "
          "(gate modulation inside the step)")
    print(f"(teacher scoring + amr_sd step) / grpo step: "
          f"{ratios['teacher_scoring_plus_amr_sd_step_over_grpo_step']:.3f}x "
          "(full AMR-SD scoring overhead)")
    print(f"(old + teacher scoring + amr_sd step) / (old scoring + grpo step): "
          f"{ratios['amr_sd_iteration_over_grpo_iteration']:.3f}x (per update, old-policy "
          "pass included)")
    print(f"FLOPs: step = 6 x {num_params / 1e6:.1f}M params x {b} x ({p} + {n}) tokens = "
          f"{flops['grpo_step'] / 1e12:.2f} TFLOP; scoring = 2 x params x tokens "
          f"({flops['old_scoring'] / 1e12:.2f} old, {flops['teacher_scoring'] / 1e12:.2f} "
          f"teacher TFLOP); vocab projection counted at all positions, attention "
          "scores/values omitted")
    print(f"MFU = achieved FLOP/s / {peak:.0f} GFLOP/s, the measured fp32 peak of a jitted "
          f"[2048x{cfg_m.hidden_size}] x [{cfg_m.hidden_size}x{8 * cfg_m.intermediate_size}] "
          "matmul")
    print(f"first run = compile + one run; skipped (non-finite) updates: {skipped}")
    write_results(results, args.out)
    return 0
