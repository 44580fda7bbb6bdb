"""Command line: amrsd {train, eval, generate, export, bench, ttsd} ... (= python run.py ...).

Subcommands import their heavy dependencies lazily so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

from .config import ConfigError

DEFAULT_MODEL = "smollm2-135m-instruct"


def _lazy(module: str):
    """The handler of a subcommand that ``amrsd_jax.<module>.main(args)`` implements: the
    module (and its heavy dependencies) is imported only when the subcommand runs."""
    def run(args) -> int:
        return importlib.import_module(f"{__package__}.{module}").main(args)

    return run


def _positive_int(text: str) -> int:
    """argparse type: a clear one-line usage error instead of a crash deep inside."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_generate(sub):
    p = sub.add_parser("generate", help="sample responses from a model (offline default: the "
                                        "bundled SmolLM2-135M-Instruct)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="bundled model name, local Hugging Face checkpoint directory, or a "
                        "training run's output_dir (its latest checkpoint)")
    p.add_argument("--prompt", action="append", default=None,
                   help="user message (repeatable); default: three arithmetic questions")
    p.add_argument("--system", default=None, help="optional system prompt")
    p.add_argument("--num-samples", type=_positive_int, default=1, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=_positive_int, default=64,
                   help="response length cap (prompt + response must fit the model's context)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)


def _add_bench(sub):
    p = sub.add_parser("bench", help="benchmarks (print a table, write JSON)")
    bsub = p.add_subparsers(dest="bench", required=True)
    g = bsub.add_parser("generate", help="sampler tokens/s vs Hugging Face PyTorch generate")
    g.add_argument("--model", default=DEFAULT_MODEL)
    g.add_argument("--batch", type=int, default=32)
    g.add_argument("--new-tokens", type=int, default=64)
    g.add_argument("--repeats", type=int, default=3, help="timed runs per engine (median)")
    g.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    g.add_argument("--out", default="bench_results/generate.json")
    g.set_defaults(func=_lazy("bench.generate"))
    s = bsub.add_parser("step", help="update-step tokens/s and MFU: GRPO vs AMR-SD, with the "
                                     "old-policy and teacher scoring passes")
    s.add_argument("--model", default=DEFAULT_MODEL)
    s.add_argument("--prompts", type=int, default=8)
    s.add_argument("--group-size", type=int, default=8, help="rollouts per prompt")
    s.add_argument("--response-tokens", type=int, default=128)
    s.add_argument("--prompt-tokens", type=int, default=48)
    s.add_argument("--micro-batches", type=int, default=4,
                   help="gradient-accumulation slices of the step (also the scoring chunks)")
    s.add_argument("--repeats", type=int, default=2, help="timed runs per phase (median)")
    s.add_argument("--out", default="bench_results/step.json")
    s.set_defaults(func=_lazy("bench.step"))
    c = bsub.add_parser("compare", help="every method on the same task, budget and seeds, "
                                        "plus AMR-SD's tau sweep and ablations (JSON, PNG, "
                                        "table)")
    c.add_argument("--config", default="configs/compare_cpu.yaml",
                   help="training config shared by every run")
    c.add_argument("overrides", nargs="*", metavar="key=value",
                   help="overrides applied to every run, e.g. steps=20")
    c.add_argument("--variants", default="main",
                   help="main (grpo amr_sd rlsd sdpo hapo oar_g), ablations (AMR-SD tau sweep, "
                        "no_reflection, symmetric, no_anneal), all, or a comma list")
    c.add_argument("--seeds", default="0,1,2")
    c.add_argument("--out", default="bench_results/compare",
                   help="runs go to <out>/runs/; finished runs are reused")
    c.add_argument("--report-only", action="store_true",
                   help="only rebuild compare.json/.md/.png from the finished runs")
    c.set_defaults(func=_lazy("bench.compare"))
    o = bsub.add_parser("overhead", help="full AMR-SD step (reflection included) vs GRPO "
                                         "step, interleaved in one process, with its levers")
    o.add_argument("--config", default="configs/compare_cpu.yaml")
    o.add_argument("overrides", nargs="*", metavar="key=value")
    o.add_argument("--steps", type=int, default=6, help="steps per variant, interleaved")
    o.add_argument("--warmup", type=int, default=1, help="first steps left out (compilation)")
    o.add_argument("--short-tokens", type=int, default=32,
                   help="reflection length of the short-reflection lever")
    o.add_argument("--variants", default=None,
                   help="comma list of amr_sd/all_rows, amr_sd/skip, amr_sd/skip+short "
                        "(GRPO always runs; default: all)")
    o.add_argument("--cache-dir", default=None,
                   help="persistent XLA cache (default <out>.xla_cache); reuse bench "
                        "compare's (<its out>/xla_cache) to keep compilation out of the timing")
    o.add_argument("--out", default="bench_results/overhead.json")
    o.set_defaults(func=_lazy("bench.overhead"))
    _add_bench_scale(bsub)
    _add_bench_ttsd(bsub)
    v = bsub.add_parser("verifier", help="math verifiers on labelled cases: accuracy, false "
                                         "positives and us/call of math-verify alone and of "
                                         "the combined reward.name=math")
    v.add_argument("--cases", action="append", default=None, metavar="JSONL",
                   help="labelled case file (repeatable; default: the two shipped with "
                        "amrsd_jax/rewards/cases)")
    v.add_argument("--paths", default=None,
                   help="comma list of math_verify, math_verify_verl, combined, "
                        "combined_lenient, combined_strict (default: all)")
    v.add_argument("--repeats", type=int, default=3, help="calls per case and path (median)")
    v.add_argument("--limit", type=int, default=0, help="only the first N cases (0 = all)")
    v.add_argument("--out", default="bench_results/verifier.json")
    v.set_defaults(func=_lazy("bench.verifier"))
    x = bsub.add_parser("sandbox", help="sandboxed code executions per second at 1 and 2 "
                                        "workers, and the overhead over a bare `python -c`")
    x.add_argument("--runs", type=_positive_int, default=40, help="executions per row")
    x.add_argument("--workers", default="1,2", help="comma list of pool sizes")
    x.add_argument("--isolation", default="auto", choices=["auto", "strict", "basic"])
    x.add_argument("--out", default="bench_results/sandbox.json")
    x.set_defaults(func=_lazy("bench.sandbox"))


def _ttsd_options(p, *, k, rounds, lr, new_tokens):
    """Options shared by ``run.py ttsd`` and ``run.py bench ttsd`` (amrsd_jax/ttsd.py)."""
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--k", type=int, default=k, help="attempts per round (the SDPO group)")
    p.add_argument("--max-rounds", "--rounds", dest="max_rounds", type=int, default=rounds,
                   help="rounds before giving up (budget = k * rounds attempts)")
    p.add_argument("--lr", type=float, default=lr, help="AdamW learning rate of the SDPO step")
    p.add_argument("--steps-per-round", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=new_tokens)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--feedback", default="own", choices=["own", "round"],
                   help="own: each attempt's teacher sees its own verifier feedback (SDPO); "
                        "round: every distinct feedback of the round")
    p.add_argument("--teacher-weights", default="ema", choices=["ema", "frozen"])
    p.add_argument("--seed", type=int, default=0)


def _add_ttsd(sub):
    p = sub.add_parser("ttsd", help="test-time self-distillation on one question: k attempts "
                                    "per round, an SDPO step after each failed round")
    p.add_argument("--question", required=True, help="the question (user message)")
    p.add_argument("--answer", required=True, help="gold answer (math verifier)")
    p.add_argument("--prompt-suffix", default="Give the final answer after 'Answer:'.",
                   help="appended to the question on a new line ('' for none)")
    _ttsd_options(p, k=8, rounds=6, lr=1e-5, new_tokens=48)
    p.add_argument("--best-of-k", action="store_true",
                   help="the baseline instead: the same rounds, no updates")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--verbose", action="store_true", help="print every attempt")
    p.add_argument("--out", default=None, help="write the record (JSON)")
    p.set_defaults(func=_lazy("ttsd"))


def _add_bench_scale(bsub):
    c = bsub.add_parser("scale", help="update step vs depth (compile time, HLO size: looped vs "
                                      "scanned layers) and per-device FLOPs / memory "
                                      "(strided vs contiguous micro-batches, remat policies), "
                                      "compiled ahead of time from shapes")
    c.add_argument("--model", default="qwen2.5-math-1.5b", help="architecture preset")
    c.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    c.add_argument("--layers", default="2,8,32", help="depths to compile (comma list; empty: "
                                                      "skip the depth sweep)")
    c.add_argument("--layer-layouts", default="loop,scan",
                   help="layer layouts of the depth sweep (comma list of loop, scan)")
    c.add_argument("--mesh", default="2,4,1", help="data,fsdp,tensor (fake CPU devices)")
    c.add_argument("--rows", type=int, default=32)
    c.add_argument("--prompt-tokens", type=int, default=256)
    c.add_argument("--response-tokens", type=int, default=256)
    c.add_argument("--micro-batches", type=int, default=4)
    c.add_argument("--remat-policies", default="none,full,save_dots",
                   help="remat policies of the layout table (comma list)")
    c.add_argument("--skip-layout", action="store_true", help="only the depth sweep")
    c.add_argument("--tpu", default=None, choices=["v4", "v5e", "v6e"],
                   help="compile for a TPU topology with libtpu instead of fake CPU devices")
    c.add_argument("--out", default="bench_results/scale.json")
    c.set_defaults(func=_lazy("bench.scale"))


def _add_bench_ttsd(bsub):
    t = bsub.add_parser("ttsd", help="test-time self-distillation vs best-of-k: attempts to "
                                     "first success on hard held-out questions")
    _ttsd_options(t, k=4, rounds=4, lr=1e-5, new_tokens=40)
    t.add_argument("--source", default="arithmetic", choices=["arithmetic", "code", "humaneval"],
                   help="held-out questions: the arithmetic or code task at --level, or "
                        "HumanEval (shortest reference solutions first)")
    t.add_argument("--level", type=int, default=0, help="task level (arithmetic 0-4, code 0-3)")
    t.add_argument("--questions", type=int, default=6, help="hard questions to run")
    t.add_argument("--pool", type=int, default=64,
                   help="held-out questions scanned (greedy) for ones the model fails")
    t.add_argument("--data-seed", type=int, default=0, help="arithmetic / code task seed")
    t.add_argument("--out", default="bench_results/ttsd.json")
    t.set_defaults(func=_lazy("bench.ttsd"))


DEFAULT_PROMPTS = (
    "What is 17 + 25? Give the final answer after 'Answer:'.",
    "Tom has 3 apples and buys 4 more. How many apples does he have now?",
    "What is 9 times 6?",
)


def _load_generate_model(name: str, dtype: str):
    """(model, tokenizer, description): a run directory gives its trained policy."""
    from .models import load_model
    from .models.export import find_run_dir, load_trained_policy

    if find_run_dir(name) is not None:
        policy = load_trained_policy(name, dtype=dtype)
        return policy.model, policy.tokenizer, policy.describe()
    model, tokenizer = load_model(name, dtype=dtype)
    return model, tokenizer, name


def cmd_generate(args) -> int:
    import jax
    import numpy as np

    from .models.tokenizer import apply_chat_template, encode_prompts
    from .rollout.sampler import SamplingConfig, generate, resolve_pad_id, resolve_stop_ids

    t0 = time.perf_counter()
    model, tokenizer, described = _load_generate_model(args.model, args.dtype)
    print(f"loaded {described} in {time.perf_counter() - t0:.1f}s "
          f"({model.config.num_params() / 1e6:.0f}M params, {args.dtype})", file=sys.stderr)
    prompts = list(args.prompt or DEFAULT_PROMPTS)
    texts = apply_chat_template(tokenizer, prompts, system_prompt=args.system)
    texts = [t for t in texts for _ in range(args.num_samples)]
    enc = encode_prompts(tokenizer, texts)
    context = model.config.max_position_embeddings
    if enc["input_ids"].shape[1] + args.max_new_tokens > context:
        raise ConfigError(
            f"--max-new-tokens {args.max_new_tokens} + the longest prompt "
            f"({enc['input_ids'].shape[1]} tokens) exceeds the model's context of {context} "
            f"tokens; use --max-new-tokens {max(context - enc['input_ids'].shape[1], 0)} "
            "or less")
    cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_p=args.top_p, top_k=args.top_k)
    t0 = time.perf_counter()
    out = generate(model, enc["input_ids"], enc["attention_mask"], jax.random.key(args.seed),
                   cfg, stop_tokens=resolve_stop_ids(tokenizer, model.config),
                   pad_id=resolve_pad_id(tokenizer))
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    elapsed = time.perf_counter() - t0
    for i, text in enumerate(texts):
        prompt = prompts[i // args.num_samples]
        response = tokenizer.decode(tokens[i, :lengths[i]], skip_special_tokens=True)
        print(f"### prompt: {prompt}\n{response.strip()}\n")
    print(f"{int(lengths.sum())} tokens in {elapsed:.1f}s (first call includes compilation)",
          file=sys.stderr)
    return 0


def _add_train(sub):
    p = sub.add_parser("train", help="train a policy with an RLVR method (default config: the "
                                     "offline AMR-SD quickstart)")
    p.add_argument("--config", default="configs/quickstart.yaml",
                   help="YAML training config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. steps=10 rollout.group_size=4 "
                        "method_config.amr_sd.tau=0.3")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in <output_dir>/checkpoints")
    p.add_argument("--dry-run", action="store_true",
                   help="build abstract params on a fake mesh of the configured shape, compile "
                        "the update step and print per-device memory (no weights loaded)")
    p.add_argument("--print-config", action="store_true",
                   help="print the fully resolved config (YAML, with every default the method "
                        "brings) and exit")
    _add_debug(p)
    p.set_defaults(func=cmd_train)


DEFAULT_CONFIG = "configs/quickstart.yaml"


def _add_eval(sub):
    p = sub.add_parser("eval", help="held-out pass@1 (greedy, sampled) and pass@k of a model "
                                    "or of a trained run")
    p.add_argument("--config", default=None,
                   help=f"YAML training config (default: the run's own config.json with "
                        f"--checkpoint, else {DEFAULT_CONFIG})")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. data.eval_size=64 eval.num_samples=8")
    p.add_argument("--checkpoint", default=None, metavar="RUN",
                   help="a run's output_dir (or its checkpoints dir): evaluate its latest "
                        "checkpoint with the run's own model, data, reward and eval settings; "
                        "metrics go to RUN/eval/")
    p.add_argument("--out", default=None, help="write the metrics (JSON)")
    p.set_defaults(func=cmd_eval)


def _add_export(sub):
    p = sub.add_parser("export", help="write a trained run's policy as a Hugging Face "
                                      "checkpoint (safetensors, tokenizer, chat template)")
    p.add_argument("run", metavar="RUN", help="a run's output_dir (or its checkpoints dir)")
    p.add_argument("out", metavar="OUT", help="new directory for the Hugging Face checkpoint")
    p.add_argument("--step", type=int, default=None,
                   help="checkpoint step to export (default: the latest)")
    p.set_defaults(func=cmd_export)


def _plain(value):
    """Tuples as lists, so YAML prints plain sequences."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _load_config(args):
    from .config import ConfigError
    from .train.config import load_train_config

    try:
        return load_train_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return None


def cmd_train(args) -> int:
    """Exit codes: 0 done, 2 bad settings (before anything is loaded), 3 stopped after
    non-finite steps, 130 / 143 stopped by SIGINT / SIGTERM after saving a checkpoint."""
    if args.print_config:
        import yaml

        config = _load_config(args)
        if config is None:
            return 2
        print(yaml.safe_dump(_plain(config.resolved_dict()), sort_keys=False), end="")
        return 0
    if args.dry_run:
        from .train.aot import main_dry_run

        return main_dry_run(args.config, args.overrides)
    config = _load_config(args)
    if config is None:
        return 2
    from .train.config import check_run_inputs

    check_run_inputs(config, resume=args.resume)  # ConfigError: one line from main(), rc 2
    from .train.trainer import RunInterrupted, TrainingStopped, train

    t0 = time.perf_counter()
    try:
        summary = train(config, resume=args.resume)
    except TrainingStopped as e:
        print(f"training stopped: {e}", file=sys.stderr)
        return 3
    except RunInterrupted as e:
        print(f"stopped at step {e.step} of {config.steps} on {e.signal_name}; checkpoint "
              f"saved in {config.output_dir}; resume with --resume", file=sys.stderr)
        return e.exit_code
    history = summary["history"]
    if history:
        first, last = history[: min(5, len(history))], history[-min(5, len(history)):]
        mean = lambda rows: sum(r["reward_mean"] for r in rows) / len(rows)  # noqa: E731
        print(f"reward mean: first {len(first)} steps {mean(first):.3f} -> last {len(last)} "
              f"steps {mean(last):.3f}")
    if summary.get("eval"):
        ev = summary["eval"]
        print(f"held-out after step {summary.get('eval_step')}: "
              + ", ".join(f"{k}={v:.3f}" for k, v in ev.items() if k.startswith("pass@")))
    print(f"wall time {time.perf_counter() - t0:.0f}s")
    print(f"metrics:    {summary['metrics_path']} (TensorBoard: "
          f"{summary['output_dir']}/tensorboard)")
    print(f"checkpoint: {summary['checkpoint_dir']}")
    return 0


def _eval_config(args):
    """(config, where it came from): a run is evaluated with its own config unless
    ``--config`` is given; its metrics go to ``<run>/eval/`` either way."""
    from .models.export import RUN_CONFIG, find_run_dir, load_run_config
    from .train.config import load_train_config

    if args.checkpoint is None:
        config_path = args.config or DEFAULT_CONFIG
        return load_train_config(config_path, args.overrides), config_path, None
    run_dir = find_run_dir(args.checkpoint)
    if run_dir is None:
        raise FileNotFoundError(f"{args.checkpoint} is not a training run directory: expected "
                                f"{RUN_CONFIG} and checkpoints/ (the output_dir of a train run); "
                                "evaluate a Hugging Face checkpoint with model.name=DIR")
    if args.config is None:
        return load_run_config(run_dir, args.overrides), run_dir / RUN_CONFIG, run_dir
    overrides = [*args.overrides, f"output_dir={run_dir}"]
    return load_train_config(args.config, overrides), args.config, run_dir


def cmd_eval(args) -> int:
    import json

    from .train.trainer import Trainer

    config, config_path, run_dir = _eval_config(args)
    print(f"config: {config_path}", file=sys.stderr)
    trainer = Trainer(config, evaluate_only=True)
    try:
        if run_dir is not None:
            try:
                step = trainer.restore_weights(run_dir)
            except FileNotFoundError:
                raise
            except Exception as e:  # orbax's tree mismatch runs to hundreds of lines
                raise ValueError(
                    f"the checkpoint in {run_dir} does not fit {config.model.name} with the "
                    f"optimizer of {config_path} ({type(e).__name__}); evaluate it with its "
                    "own config (leave out --config)") from None
            print(f"evaluating {run_dir} at step {step} ({config.method} on "
                  f"{config.model.name})", file=sys.stderr)
        else:
            print(f"evaluating {config.model.name} (untrained)", file=sys.stderr)
        metrics = trainer.evaluate(trainer.start_step, progress=True)
    finally:
        trainer.close()
    if metrics is None:
        print("no held-out examples configured (data.eval_size / data.eval_path)",
              file=sys.stderr)
        return 2
    for k, v in metrics.items():
        print(f"{k:>24s}  {v:.4f}" if isinstance(v, float) else f"{k:>24s}  {v}")
    print(f"metrics appended to {trainer.metrics.path}", file=sys.stderr)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(metrics, indent=2))
    return 0


def cmd_export(args) -> int:
    from .models.export import check_export_target, export_hf_checkpoint, load_trained_policy

    check_export_target(args.out)  # before minutes of loading
    t0 = time.perf_counter()
    policy = load_trained_policy(args.run, step=args.step)
    print(f"exporting {policy.describe()}", file=sys.stderr)
    out = export_hf_checkpoint(policy, args.out)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"wrote {out} ({size / 2**20:.0f} MiB, {time.perf_counter() - t0:.0f}s): load it with "
          f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}) or "
          f"`generate --model {out}`")
    return 0


def _add_debug(parser) -> None:
    # SUPPRESS: a subcommand's copy of the flag must not reset the top-level one
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback of an error")


def build_parser() -> argparse.ArgumentParser:
    # prog: argparse's default, the name it was started as (`run.py` or the `amrsd` script)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_eval(sub)
    _add_generate(sub)
    _add_export(sub)
    _add_bench(sub)
    _add_ttsd(sub)
    return parser


# errors in what the user gave (a setting, a path, an existing run): exit code 2
USER_ERRORS = (ConfigError, FileExistsError, FileNotFoundError, NotADirectoryError,
               IsADirectoryError, PermissionError)


def parse_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """``parser.parse_args`` that also takes ``key=value`` overrides after a flag
    (``train steps=1 --resume seed=2``): argparse fills a ``nargs="*"`` positional from its
    first run of values only, so later ones come back unrecognised and are appended here."""
    args, extra = parser.parse_known_args(argv)
    late = [a for a in extra if "=" in a and not a.startswith("-")]
    if late and isinstance(getattr(args, "overrides", None), list):
        args.overrides += late
        extra = [a for a in extra if a not in late]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if isinstance(error, USER_ERRORS) else f"{type(error).__name__}: {text}"


def main(argv=None) -> int:
    args = parse_args(build_parser(), argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:  # outside the training loop, which saves and exits 130 itself
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line for the user, the traceback on request
        if args.debug:
            raise
        if isinstance(e, USER_ERRORS):
            print(f"error: {_one_line(e)}", file=sys.stderr)
            return 2
        print(f"error: {_one_line(e)} (--debug shows the traceback)", file=sys.stderr)
        return 1
