"""Command line: ``python run.py {generate, bench} ...``.

Subcommands import their heavy dependencies lazily so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import sys
import time

DEFAULT_MODEL = "smollm2-135m-instruct"


def _add_generate(sub):
    p = sub.add_parser("generate", help="sample responses from a model (offline default: the "
                                        "bundled SmolLM2-135M-Instruct)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="bundled model name or local Hugging Face checkpoint directory")
    p.add_argument("--prompt", action="append", default=None,
                   help="user message (repeatable); default: three arithmetic questions")
    p.add_argument("--system", default=None, help="optional system prompt")
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
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
    g.set_defaults(func=lambda a: __import__("amrsd_jax.bench.generate",
                                             fromlist=["main"]).main(a))
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
    s.set_defaults(func=lambda a: __import__("amrsd_jax.bench.step",
                                             fromlist=["main"]).main(a))


DEFAULT_PROMPTS = (
    "What is 17 + 25? Give the final answer after 'Answer:'.",
    "Tom has 3 apples and buys 4 more. How many apples does he have now?",
    "What is 9 times 6?",
)


def cmd_generate(args) -> int:
    import jax
    import numpy as np

    from .models import load_model
    from .models.tokenizer import apply_chat_template, encode_prompts
    from .rollout import SamplingConfig, generate

    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    print(f"loaded {args.model} in {time.perf_counter() - t0:.1f}s "
          f"({model.config.num_params() / 1e6:.0f}M params, {args.dtype})", file=sys.stderr)
    prompts = list(args.prompt or DEFAULT_PROMPTS)
    texts = apply_chat_template(tokenizer, prompts, system_prompt=args.system)
    texts = [t for t in texts for _ in range(args.num_samples)]
    enc = encode_prompts(tokenizer, texts)
    cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_p=args.top_p, top_k=args.top_k)
    stops = sorted({tokenizer.eos_token_id, *model.config.eos_token_ids} - {None})
    t0 = time.perf_counter()
    out = generate(model, enc["input_ids"], enc["attention_mask"], jax.random.key(args.seed),
                   cfg, stop_tokens=stops, pad_id=tokenizer.pad_token_id)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    elapsed = time.perf_counter() - t0
    for i, text in enumerate(texts):
        prompt = prompts[i // args.num_samples]
        response = tokenizer.decode(tokens[i, :lengths[i]], skip_special_tokens=True)
        print(f"### prompt: {prompt}\n{response.strip()}\n")
    print(f"{int(lengths.sum())} tokens in {elapsed:.1f}s (first call includes compilation)",
          file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="run.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_bench(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)
