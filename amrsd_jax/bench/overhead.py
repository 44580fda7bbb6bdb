"""``python run.py bench overhead``: wall-clock cost of a full AMR-SD training step over a
GRPO step, measured side by side in one process.

Every variant is an ordinary :class:`~amrsd_jax.train.trainer.Trainer` on the same config,
seed and (shared, read-only) initial weights; the steps are interleaved (GRPO step 0, each
AMR-SD variant's step 0, GRPO step 1, ...) so machine noise hits all of them alike. A full
step is everything ``train_step`` does: rollouts, verification, reflection generation, the
leak guard, teacher scoring, old-policy scoring and the update. The first ``--warmup``
steps of each variant (compilation) are left out; the table gives per-phase medians and the
ratio of median step times to GRPO's.

Variants (the levers on AMR-SD's overhead):

- ``amr_sd/all_rows``: every rollout gets a reflection and a teacher pass
  (``reflection.skip_uninformative=false``), the default 96-token reflections;
- ``amr_sd/skip``: only rows of groups with unequal rewards (the default; exact, since an
  all-equal group has advantage 0), 96-token reflections;
- ``amr_sd/skip+short``: the default plus ``reflection.max_tokens=<--short-tokens>``;
- ``amr_sd/skip+short+follow_up``: plus ``reflection.request=follow_up``: the request is a
  next user turn after the rollout, prefilled on top of the rollout's KV cache, so the
  question and the attempt are not computed a second time.
"""

from __future__ import annotations

import statistics
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx
from tqdm.auto import tqdm

from ..models import load_model
from ..train.config import load_train_config
from ..train.trainer import Trainer
from .harness import use_compilation_cache, write_results

PHASES = ("generate", "reflect", "score", "update", "step")


def variants(short_tokens: int) -> dict[str, tuple[str, ...]]:
    return {
        "grpo": ("method=grpo",),
        "amr_sd/all_rows": ("method=amr_sd", "reflection.skip_uninformative=false",
                            "reflection.max_tokens=96"),
        "amr_sd/skip": ("method=amr_sd", "reflection.max_tokens=96"),
        "amr_sd/skip+short": ("method=amr_sd", f"reflection.max_tokens={short_tokens}"),
        "amr_sd/skip+short+follow_up": ("method=amr_sd", f"reflection.max_tokens={short_tokens}",
                                        "reflection.request=follow_up"),
    }


def main(args) -> int:
    # the persistent cache (e.g. bench compare's) spares the timed steps new compilations
    use_compilation_cache(args.cache_dir or f"{args.out}.xla_cache")
    args.config = args.config or None  # "" = the TrainConfig defaults
    base = load_train_config(args.config, list(args.overrides))
    model, tokenizer = load_model(base.model.name, base.model.dtype)
    initial = nnx.state(model, nnx.Param)
    names = variants(args.short_tokens)
    if args.variants:
        wanted = ["grpo", *[v for v in args.variants.split(",") if v and v != "grpo"]]
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            raise SystemExit(f"unknown variants {unknown}; choose from {sorted(names)}")
        names = {k: names[k] for k in wanted}
    trainers = {}
    for name, extra in names.items():
        cfg = load_train_config(args.config, [
            *args.overrides, *extra, f"output_dir=/tmp/amrsd_overhead/{name.replace('/', '-')}",
            "checkpoint.every=0", "checkpoint.save_at_end=false", "eval.at_start=false",
            "eval.at_end=false", "eval.every=0", "progress=false", "tensorboard=false"])
        # every trainer starts from the same weights, in buffers of its own (steps donate)
        nnx.update(model, jax.tree.map(jnp.copy, initial))
        trainers[name] = Trainer(cfg, model=model, tokenizer=tokenizer,
                                 log=lambda m: None)
    times: dict[str, list[dict]] = {n: [] for n in names}
    total = args.steps * len(names)
    bar = tqdm(total=total, desc="overhead", unit="step")
    for step in range(args.steps):
        for name, trainer in trainers.items():
            t0 = time.perf_counter()
            metrics = trainer.train_step(step).metrics
            metrics["time/step"] = time.perf_counter() - t0
            times[name].append(metrics)
            bar.update(1)
            bar.set_postfix(variant=name, s=f"{metrics['time/step']:.1f}")
    bar.close()
    for trainer in trainers.values():
        trainer.close()

    rows = {}
    for name, records in times.items():
        timed = records[args.warmup:]
        row = {p: statistics.median(r.get(f"time/{p}", 0.0) for r in timed) for p in PHASES}
        row["reflected_frac"] = statistics.fmean(r.get("reflected_frac", 0.0) for r in timed)
        row["accuracy"] = statistics.fmean(r["accuracy"] for r in timed)
        row["steps_timed"] = len(timed)
        row["per_step"] = [r["time/step"] for r in records]
        rows[name] = row
    ref = rows["grpo"]["step"]
    for row in rows.values():
        row["ratio_vs_grpo"] = row["step"] / ref
    print(f"\nmedian seconds per phase over {args.steps - args.warmup} interleaved steps "
          f"(after {args.warmup} warm-up), {base.rollout.prompts_per_step} prompts x "
          f"{base.rollout.group_size} rollouts, {base.rollout.max_new_tokens} response tokens")
    print("| variant | generate | reflect | score | update | full step | x GRPO | rows reflected |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        print(f"| {name} | {r['generate']:.1f} | {r['reflect']:.1f} | {r['score']:.1f} | "
              f"{r['update']:.1f} | {r['step']:.1f} | {r['ratio_vs_grpo']:.2f} | "
              f"{r['reflected_frac']:.2f} |")
    write_results({"config": args.config, "overrides": list(args.overrides),
                   "steps": args.steps, "warmup": args.warmup, "variants": rows,
                   "command": "python run.py bench overhead " + " ".join(sys.argv[3:])},
                  args.out)
    return 0
