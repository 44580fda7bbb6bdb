"""``python run.py bench compare``: every credit-assignment method on the same task, budget
and seeds, plus AMR-SD's tau sweep and ablations.

Each (variant, seed) is one ordinary training run (:func:`amrsd_jax.train.trainer.train`)
of the ``--config`` (default ``configs/compare_cpu.yaml``) with the variant's overrides,
written to ``<out>/runs/<variant>-seed<seed>/``. A run whose ``done.json`` exists is reused,
so an interrupted comparison continues where it stopped and ``--report-only`` rebuilds the
report from whatever has finished.

Variants (the issue's comparison and the ablations of the paper's Table 3 kind):

- ``grpo amr_sd rlsd sdpo hapo oar_g``: each method with its defaults (docs/methods.md);
- ``amr_sd/tau=<v>``: the dead-zone threshold sweep (0.5 is the default, so ``amr_sd``);
- ``amr_sd/no_reflection``: the teacher sees a verified peer rollout verbatim instead of a
  self-written hint or critique (``reflection.source=raw_peer``);
- ``amr_sd/symmetric``: ``gam = lam`` (the 2:1 asymmetry removed);
- ``amr_sd/no_anneal``: ``decay_steps=null`` (the gate stays on for the whole run).

The step-0 held-out evaluation depends only on the seed (same initial weights, same
evaluation key), so it runs once per seed and is shared by that seed's variants.

Every variant's final held-out evaluation is also compared with GRPO's of the same seed,
question by question (``eval_outcomes.jsonl`` of each run; :func:`paired_against`): the
difference in pass@1 with its standard error, which is what tells a 0.05 difference from
noise.

Outputs: ``<out>/compare.json`` (settings, per-run curves, per-variant summaries),
``<out>/compare.png`` (train reward and held-out pass@1 against step, mean and min-max band
over seeds) and the table printed as Markdown (also ``<out>/compare.md``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..train.config import load_train_config
from ..train.metrics import read_metrics
from ..train.trainer import train
from .harness import progress, use_compilation_cache

MAIN = ("grpo", "amr_sd", "rlsd", "sdpo", "hapo", "oar_g")
ABLATIONS = ("amr_sd/tau=0.25", "amr_sd/tau=1.0", "amr_sd/no_reflection",
             "amr_sd/symmetric", "amr_sd/no_anneal")
#: variant -> (method, overrides); ``{lam}`` is replaced by the config's AMR-SD lam
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    **{m: (m, ()) for m in MAIN},
    "oar_p": ("oar_p", ()),
    "amr_sd/tau=0.25": ("amr_sd", ("method_config.amr_sd.tau=0.25",)),
    "amr_sd/tau=1.0": ("amr_sd", ("method_config.amr_sd.tau=1.0",)),
    "amr_sd/no_reflection": ("amr_sd", ("reflection.source=raw_peer",)),
    "amr_sd/symmetric": ("amr_sd", ("method_config.amr_sd.gam={lam}",)),
    "amr_sd/no_anneal": ("amr_sd", ("method_config.amr_sd.decay_steps=null",)),
}
PASS1 = "pass@1_sampled"
BASELINE = "grpo"  # the paired differences are taken against it


def expand_variants(spec: str) -> list[str]:
    """``main``, ``ablations``, ``all`` or a comma list of variant names."""
    out: list[str] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        names = {"main": MAIN, "ablations": ABLATIONS, "all": MAIN + ABLATIONS}.get(part)
        if names is None:
            if part not in VARIANTS:
                raise SystemExit(f"unknown variant {part!r}; choose from main, ablations, all "
                                 f"or {sorted(VARIANTS)}")
            names = (part,)
        out += [n for n in names if n not in out]
    return out


def run_dir(out: Path, variant: str, seed: int) -> Path:
    return out / "runs" / f"{variant.replace('/', '-')}-seed{seed}"


def variant_config(config_path: str, variant: str, seed: int, out: Path,
                   overrides: list[str], at_start: bool):
    method, extra = VARIANTS[variant]
    config_path = config_path or None  # "" = the TrainConfig defaults
    base = load_train_config(config_path, overrides)
    lam = base.method_settings("amr_sd").lam
    return load_train_config(config_path, [
        *overrides, f"method={method}", f"seed={seed}",
        f"output_dir={run_dir(out, variant, seed)}", f"eval.at_start={str(at_start).lower()}",
        *(e.format(lam=lam) for e in extra)])


def run_one(config_path: str, variant: str, seed: int, out: Path,
            overrides: list[str]) -> dict | None:
    """Train one (variant, seed) unless it already finished (returns its ``done.json``) or
    another live process is training it (returns None)."""
    directory = run_dir(out, variant, seed)
    done = directory / "done.json"
    if done.exists():
        return json.loads(done.read_text())
    lock = directory / "running.pid"
    if _held_by_live_process(lock):  # another `bench compare` (e.g. other seeds) has it
        print(f"{variant} seed {seed} is running in process {lock.read_text()}; skipped",
              file=sys.stderr)
        return None
    if directory.exists():  # an interrupted run: start it again from scratch
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    lock.write_text(str(os.getpid()))
    initial = out / f"initial_eval-seed{seed}.json"
    config = variant_config(config_path, variant, seed, out, overrides,
                            at_start=not initial.exists())
    t0 = time.perf_counter()
    summary = train(config)
    if not summary["history"] or summary["history"][-1]["step"] < config.steps:
        # the trainer stopped early (SIGTERM): leave the run unfinished and stop here
        raise SystemExit(f"{variant} seed {seed} stopped before step {config.steps}; "
                         "rerun the same command to continue")
    record = {"variant": variant, "method": config.method, "seed": seed,
              "wall_s": time.perf_counter() - t0, "config": config.to_dict()}
    if not initial.exists():
        step0 = [r for r in read_metrics(directory / "metrics.jsonl", "eval") if r["step"] == 0]
        initial.write_text(json.dumps(step0[0]))
    done.write_text(json.dumps(record))
    lock.unlink(missing_ok=True)
    return record


def _held_by_live_process(lock: Path) -> bool:
    try:
        pid = int(lock.read_text())
    except (OSError, ValueError):
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------- aggregation
def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def load_runs(out: Path, variants: list[str], seeds: list[int]) -> dict[str, dict[int, dict]]:
    """Finished runs' curves: ``{variant: {seed: {"train": [...], "eval": [...]}}}``."""
    runs: dict[str, dict[int, dict]] = {}
    for variant in variants:
        for seed in seeds:
            directory = run_dir(out, variant, seed)
            if not (directory / "done.json").exists():
                continue
            evals = read_metrics(directory / "metrics.jsonl", "eval")
            initial = out / f"initial_eval-seed{seed}.json"
            if initial.exists() and not any(r["step"] == 0 for r in evals):
                evals = [json.loads(initial.read_text())] + evals
            done = json.loads((directory / "done.json").read_text())
            rollout = done["config"]["rollout"]
            outcomes = read_metrics(directory / "eval_outcomes.jsonl", "eval_outcomes")
            runs.setdefault(variant, {})[seed] = {
                "train": read_metrics(directory / "metrics.jsonl", "train"), "eval": evals,
                "final_outcomes": outcomes[-1] if outcomes else None,
                "wall_s": done["wall_s"],
                "batch": rollout["prompts_per_step"] * rollout["group_size"]}
    return runs


def summarize(per_seed: dict[int, dict]) -> dict[str, Any]:
    """One variant's table row from its seeds' curves."""
    final = [r["eval"][-1][PASS1] for r in per_seed.values() if r["eval"]]
    greedy = [r["eval"][-1]["pass@1_greedy"] for r in per_seed.values() if r["eval"]]
    best = [max(e[PASS1] for e in r["eval"]) for r in per_seed.values() if r["eval"]]
    initial = [r["eval"][0][PASS1] for r in per_seed.values() if r["eval"]]
    last_reward = [statistics.fmean(t["reward_mean"] for t in r["train"][-3:])
                   for r in per_seed.values()]
    step_times = [t["time/step"] for r in per_seed.values() for t in r["train"]]
    row: dict[str, Any] = {"seeds": sorted(per_seed)}
    for name, values in (("final_pass@1", final), ("final_pass@1_greedy", greedy),
                         ("best_pass@1", best), ("initial_pass@1", initial),
                         ("last3_train_reward", last_reward)):
        row[name + "_mean"], row[name + "_std"] = _mean_std(values)
    row["step_time_median_s"] = statistics.median(step_times) if step_times else math.nan
    trains = [t for r in per_seed.values() for t in r["train"]]
    for key in ("amr_sd/gated_frac", "amr_sd/gated_frac_correct",
                "amr_sd/gated_frac_incorrect", "amr_sd/ihat_q05", "amr_sd/ihat_q95",
                "reflected_frac", "reflection_length_mean", "reflection_gain_correct",
                "reflection_gain_incorrect"):
        values = [t[key] for t in trains if key in t]
        if values:
            row[key.removeprefix("amr_sd/") + "_mean"] = statistics.fmean(values)
    if any("redactions" in t for t in trains):
        row["redactions"] = sum(t.get("redactions", 0) for t in trains)
        row["reflections"] = round(sum(t.get("reflected_frac", 0.0) * r["batch"]
                                       for r in per_seed.values() for t in r["train"]))
    return row


def _question_scores(outcomes: dict) -> dict[str, dict]:
    """``{"sampled": {id: pass@1}, "greedy": {id: 0/1}}`` of one evaluation."""
    scores: dict[str, dict] = {}
    if "n_correct" in outcomes:
        scores["sampled"] = {str(i): c / k for i, c, k in zip(
            outcomes["id"], outcomes["n_correct"], outcomes["num_samples"])}
    if "greedy_correct" in outcomes:
        scores["greedy"] = {str(i): float(c) for i, c in zip(outcomes["id"],
                                                              outcomes["greedy_correct"])}
    return scores


def paired_against(runs: dict[str, dict[int, dict]], variant: str,
                   baseline: str = BASELINE) -> dict[str, Any] | None:
    """Final held-out pass@1 of ``variant`` minus ``baseline``, paired by seed and question.

    Per seed: the mean over the questions both runs evaluated of the per-question difference
    (sampled: ``n_correct / num_samples``; greedy: 0/1), with its standard error over
    questions (the evaluation noise of that seed). Over seeds: the mean of the per-seed
    differences and its standard error over seeds (evaluation noise plus the run-to-run
    spread; NaN with one seed). None when no seed has both runs' per-question outcomes."""
    per_seed: dict[str, list[dict]] = {"sampled": [], "greedy": []}
    for seed in sorted(runs.get(variant, {})):
        ours = runs[variant][seed].get("final_outcomes")
        theirs = runs.get(baseline, {}).get(seed, {}).get("final_outcomes")
        if not ours or not theirs:
            continue
        a, b = _question_scores(ours), _question_scores(theirs)
        for kind in per_seed:
            if kind not in a or kind not in b:
                continue
            common = sorted(set(a[kind]) & set(b[kind]))
            diffs = np.array([a[kind][q] - b[kind][q] for q in common])
            if len(diffs) < 2:
                continue
            per_seed[kind].append({"seed": seed, "questions": len(diffs),
                                   "diff": float(diffs.mean()),
                                   "se": float(diffs.std(ddof=1) / math.sqrt(len(diffs)))})
    if not any(per_seed.values()):
        return None
    result: dict[str, Any] = {"baseline": baseline}
    for kind, rows in per_seed.items():
        diffs = [r["diff"] for r in rows]
        result[kind] = {"per_seed": rows, "mean": _mean_std(diffs)[0],
                        "se": (statistics.stdev(diffs) / math.sqrt(len(diffs))
                               if len(diffs) > 1 else math.nan)}
    return result


def _paired_cell(paired: dict | None, kind: str) -> str:
    if not paired or not paired[kind]["per_seed"]:
        return "-"
    p = paired[kind]
    seeds = ", ".join(f"{r['diff']:+.3f}±{r['se']:.3f}" for r in p["per_seed"])
    se = "" if math.isnan(p["se"]) else f" ± {p['se']:.3f}"
    return f"**{p['mean']:+.3f}{se}** ({seeds})"


def paired_table(summary: dict[str, dict]) -> str:
    """Differences against the baseline, paired per seed and question (``paired_against``)."""
    head = ("| variant | questions per seed | Δ pass@1 sampled vs GRPO: mean ± SE over seeds "
            "(per seed ± SE over questions) | Δ greedy vs GRPO |")
    lines = [head, "| --- | --- | --- | --- |"]
    for variant, row in summary.items():
        paired = row.get("paired")
        if variant == BASELINE or not paired:
            continue
        questions = sorted({r["questions"] for k in ("sampled", "greedy")
                            for r in paired[k]["per_seed"]})
        lines.append(f"| {variant} | {'/'.join(map(str, questions))} | "
                     f"{_paired_cell(paired, 'sampled')} | {_paired_cell(paired, 'greedy')} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def _fmt(row: dict, key: str) -> str:
    m, s = row.get(key + "_mean", math.nan), row.get(key + "_std", math.nan)
    return "-" if math.isnan(m) else f"{m:.3f} ± {s:.3f}"


def _gain(row: dict) -> str:
    values = [row.get(f"reflection_gain_{k}_mean") for k in ("correct", "incorrect")]
    return " / ".join("-" if v is None else f"{v:+.3f}" for v in values)


def markdown_table(summary: dict[str, dict]) -> str:
    head = ("| variant | seeds | held-out pass@1 final | greedy final | best pass@1 | "
            "pass@1 at step 0 | train reward (last 3) | median step (s) | gated frac | "
            "redactions | gain hint / critique (nats) |")
    lines = [head, "|" + "|".join([" --- "] * (head.count("|") - 1)) + "|"]
    for variant, row in summary.items():
        gated = row.get("gated_frac_mean")
        redactions = (f"{row['redactions']} of {row['reflections']}" if "redactions" in row
                      else "-")
        lines.append(
            f"| {variant} | {len(row['seeds'])} | {_fmt(row, 'final_pass@1')} | "
            f"{_fmt(row, 'final_pass@1_greedy')} | {_fmt(row, 'best_pass@1')} | "
            f"{_fmt(row, 'initial_pass@1')} | {_fmt(row, 'last3_train_reward')} | "
            f"{row['step_time_median_s']:.1f} | "
            f"{'-' if gated is None else f'{gated:.3f}'} | {redactions} | {_gain(row)} |")
    return "\n".join(lines)


def plot(runs: dict[str, dict[int, dict]], path: Path, groups: dict[str, list[str]]) -> None:
    """Train reward and held-out pass@1 against step: seed mean, min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {k: [v for v in vs if v in runs] for k, vs in groups.items()}
    groups = {k: vs for k, vs in groups.items() if vs}
    # constrained layout makes room for the legends placed outside the data
    fig, axes = plt.subplots(len(groups), 2, figsize=(14, 4.2 * len(groups)), squeeze=False,
                             layout="constrained")
    for row, (title, variants) in enumerate(groups.items()):
        for variant in variants:
            per_seed = list(runs[variant].values())
            for col, (kind, key) in enumerate((("train", "reward_mean"), ("eval", PASS1))):
                steps = [r["step"] for r in per_seed[0][kind]]
                curves = np.array([[r[key] for r in s[kind]] for s in per_seed
                                   if [r["step"] for r in s[kind]] == steps])
                if not len(curves):
                    continue
                ax = axes[row, col]
                line, = ax.plot(steps, curves.mean(0), marker="o" if kind == "eval" else None,
                                label=f"{variant} (n={len(curves)})")
                if len(curves) > 1:
                    ax.fill_between(steps, curves.min(0), curves.max(0), alpha=0.15,
                                    color=line.get_color())
        axes[row, 0].set(title=f"{title}: train reward per step", xlabel="step",
                         ylabel="mean reward")
        axes[row, 1].set(title=f"{title}: held-out {PASS1}", xlabel="step", ylabel=PASS1)
        for ax in axes[row]:
            ax.grid(alpha=0.3)
        axes[row, 1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_diagnostics(runs: dict[str, dict[int, dict]], path: Path, variants: list[str]) -> bool:
    """Why AMR-SD does (not) help, per training step and seed: the reflection gain (mean
    per-token lp_T - lp_old of the reflected rollouts; > 0 means the self-written hint or
    critique made the rollout more likely) and the fraction of tokens the gate opened on,
    split by outcome. Returns False when no run logged them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("reflection gain", "mean lp_T - lp_old (nats/token)",
               (("reflection_gain_correct", "hint, correct"),
                ("reflection_gain_incorrect", "critique, incorrect"))),
              ("gated fraction of response tokens", "fraction of tokens with D > 0",
               (("amr_sd/gated_frac_correct", "correct rollouts"),
                ("amr_sd/gated_frac_incorrect", "incorrect rollouts"))))
    variants = [v for v in variants if v in runs and any(
        "reflection_gain_correct" in t or "amr_sd/gated_frac" in t
        for r in runs[v].values() for t in r["train"])]
    if not variants:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.2), layout="constrained")
    markers = "os^Dv<>ph*"
    colors = ("tab:green", "tab:red")
    for ax, (title, ylabel, series) in zip(axes, panels):
        for (key, _), color in zip(series, colors):
            for variant, marker in zip(variants, markers):
                points = [(t["step"], t[key]) for r in runs[variant].values()
                          for t in r["train"] if key in t]
                if points:
                    steps, values = zip(*points)
                    ax.scatter(steps, values, color=color, marker=marker, alpha=0.6, s=22)
        ax.axhline(0.0, color="black", lw=0.8)
        ax.set(title=title, xlabel="training step", ylabel=ylabel)
        ax.grid(alpha=0.3)
    # two short legends outside the data (colour = outcome, marker = variant) instead of one
    # entry per (outcome, variant) pair on top of the points
    outcome = [plt.Line2D([], [], ls="", marker="o", color=c, label=label)
               for c, label in zip(colors, ("correct rollout (hint)",
                                            "incorrect rollout (critique)"))]
    variant_marks = [plt.Line2D([], [], ls="", marker=m, color="0.3", label=v)
                     for v, m in zip(variants, markers)]
    fig.legend(handles=outcome + variant_marks, loc="outside right upper", fontsize=8)
    fig.suptitle("AMR-SD diagnostics, every seed and step", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def report(out: Path, variants: list[str], seeds: list[int], settings: dict) -> dict:
    runs = load_runs(out, variants, seeds)
    summary = {v: summarize(runs[v]) for v in variants if v in runs}
    for variant, row in summary.items():
        if variant != BASELINE:
            row["paired"] = paired_against(runs, variant)
    missing = [f"{v} seed {s}" for v in variants for s in seeds
               if s not in runs.get(v, {})]
    result = {"settings": settings, "summary": summary, "missing": missing,
              "runs": {v: {str(s): r for s, r in per.items()} for v, per in runs.items()}}
    (out / "compare.json").write_text(json.dumps(result, indent=1))
    table = markdown_table(summary)
    paired = paired_table(summary)
    if paired:
        table += "\n\n" + paired
    (out / "compare.md").write_text(table + "\n")
    if runs:
        plot(runs, out / "compare.png",
             {"methods": [v for v in variants if v in MAIN or v == "oar_p"],
              "AMR-SD sweep and ablations": ["amr_sd", *[v for v in variants
                                                          if v.startswith("amr_sd/")]]})
        plot_diagnostics(runs, out / "compare_diagnostics.png",
                         [v for v in variants if v == "amr_sd" or v.startswith("amr_sd/")])
    print(table)
    if missing:
        print(f"\nnot finished: {', '.join(missing)}")
    print(f"\nwrote {out / 'compare.json'}, {out / 'compare.md'}"
          + (f", {out / 'compare.png'}, {out / 'compare_diagnostics.png'}" if runs else ""))
    return result


def main(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    variants = expand_variants(args.variants)
    seeds = [int(s) for s in args.seeds.split(",")]
    settings = {"config": args.config, "overrides": list(args.overrides),
                "variants": variants, "seeds": seeds,
                "command": "python run.py bench compare " + " ".join(sys.argv[3:])}
    if not args.report_only:
        # every run builds fresh jitted closures; the persistent cache shares their programs
        use_compilation_cache(out / "xla_cache")
        order = [(v, s) for s in seeds for v in variants]  # seed-major: early seeds finish
        for n, (variant, seed) in enumerate(order, 1):
            progress("compare", f"[{n}/{len(order)}] {variant} seed {seed}")
            run_one(args.config, variant, seed, out, list(args.overrides))
            report(out, variants, seeds, settings)
    report(out, variants, seeds, settings)
    return 0
