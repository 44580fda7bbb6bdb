"""``python run.py bench generate``: sampler throughput against Hugging Face PyTorch ``generate``.

Both engines get the same weights (the converted bundled checkpoint), the same chat-templated
prompts, the same lengths (exactly ``new_tokens`` per row: stop tokens disabled) and sample at
temperature 1 with no top-k/top-p. Times are medians of ``repeats`` runs after one warm-up
run (which includes compilation for JAX), measured side by side in one process.
"""

from __future__ import annotations

import sys

import jax
import numpy as np
from flax import nnx

from ..models import load_model, resolve_checkpoint
from ..models.tokenizer import apply_chat_template, encode_prompts
from ..rollout import SamplingConfig, generate, resolve_pad_id
from .harness import (format_table, measure_copy_bandwidth, measure_matmul_gflops, progress,
                      time_runs, write_results)


def bench_prompts(n: int) -> list[str]:
    rng = np.random.default_rng(0)
    return [f"What is {a} + {b}? Think step by step." for a, b in rng.integers(10, 99, (n, 2))]


def main(args) -> int:
    path = resolve_checkpoint(args.model)
    model, tokenizer = load_model(path, dtype="float32")
    texts = apply_chat_template(tokenizer, bench_prompts(args.batch))
    enc = encode_prompts(tokenizer, texts)
    cfg = SamplingConfig(max_new_tokens=args.new_tokens, temperature=1.0)
    total_tokens = args.batch * args.new_tokens
    keys = iter(jax.random.split(jax.random.key(0), args.repeats + 1))

    def run_jax():
        out = generate(model, enc["input_ids"], enc["attention_mask"], next(keys), cfg,
                       stop_tokens=[], pad_id=resolve_pad_id(tokenizer))
        jax.block_until_ready(out.tokens)
        assert int(np.asarray(out.lengths).min()) == args.new_tokens

    progress("generate", f"{args.model}: batch {args.batch}, prompt "
             f"{enc['input_ids'].shape[1]} tokens, {args.new_tokens} new tokens, fp32, "
             "temperature 1")
    jax_timing = time_runs(run_jax, args.repeats)
    jax_median = jax_timing.median_s
    results = {
        "model": str(args.model), "batch": args.batch,
        "prompt_tokens": int(enc["input_ids"].shape[1]), "new_tokens": args.new_tokens,
        "dtype": "float32", "repeats": args.repeats,
        "amrsd_jax": jax_timing.to_dict() | {"tokens_per_s": total_tokens / jax_median},
    }

    if not args.no_torch:
        try:
            import torch
            import transformers
        except ImportError:
            print("torch not installed: skipping the PyTorch baseline "
                  "(pip install torch==2.13.0)", file=sys.stderr)
        else:
            hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
            hf.train(False)  # inference mode (no dropout); same as torch Module.eval
            ids = torch.tensor(enc["input_ids"], dtype=torch.long)
            mask = torch.tensor(enc["attention_mask"], dtype=torch.long)
            torch.manual_seed(0)

            def run_torch():
                with torch.inference_mode():
                    out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                                      temperature=1.0, top_k=0, top_p=1.0,
                                      max_new_tokens=args.new_tokens,
                                      min_new_tokens=args.new_tokens,
                                      pad_token_id=tokenizer.pad_token_id)
                assert out.shape[1] == ids.shape[1] + args.new_tokens

            torch_timing = time_runs(run_torch, args.repeats)
            torch_median = torch_timing.median_s
            results["torch_generate"] = {
                "torch": torch.__version__, "transformers": transformers.__version__,
                "threads": torch.get_num_threads(), **torch_timing.to_dict(),
                "tokens_per_s": total_tokens / torch_median}
            results["speedup_vs_torch"] = torch_median / jax_median

    # Compute floor: every prompt and generated token costs ~2 x params FLOPs (the lm_head
    # included); at batch 32 a decode step is compute-bound on a CPU, not bandwidth-bound.
    cfg_m = model.config
    flops_per_token = 2 * cfg_m.num_params()
    total_flops = flops_per_token * args.batch * (int(enc["attention_mask"].sum(1).mean())
                                                  + args.new_tokens)
    peak = measure_matmul_gflops(2048, cfg_m.hidden_size, cfg_m.intermediate_size * 8)
    decode_rate = measure_matmul_gflops(args.batch, cfg_m.hidden_size, cfg_m.intermediate_size)
    results["compute"] = {
        "total_gflop": total_flops / 1e9, "matmul_peak_gflops": peak,
        "decode_shape_matmul_gflops": decode_rate,
        "compute_floor_s": total_flops / 1e9 / peak,
        "achieved_gflops": total_flops / 1e9 / jax_median}
    weight_bytes = sum(int(np.prod(v.shape)) * v.dtype.itemsize
                       for v in jax.tree.leaves(nnx.state(model)))
    bandwidth = measure_copy_bandwidth()
    floor = weight_bytes / bandwidth
    step = jax_median / args.new_tokens  # prefill amortised into the per-step time
    results["floor"] = {"weight_bytes": weight_bytes, "copy_bandwidth_gb_s": bandwidth / 1e9,
                        "decode_step_floor_ms": floor * 1e3, "measured_step_ms": step * 1e3,
                        "steps_above_floor": step / floor}

    rows = [("engine", "median s", "tokens/s", "runs (s)")]
    rows.append(("amrsd_jax", f"{jax_median:.2f}", f"{total_tokens / jax_median:.0f}",
                 ", ".join(f"{r:.2f}" for r in jax_timing.runs_s)))
    if "torch_generate" in results:
        t = results["torch_generate"]
        rows.append((f"torch {t['torch']} generate", f"{t['median_s']:.2f}",
                     f"{t['tokens_per_s']:.0f}", ", ".join(f"{r:.2f}" for r in t["runs_s"])))
    print(format_table(rows))
    if "speedup_vs_torch" in results:
        print(f"speed-up vs PyTorch generate: {results['speedup_vs_torch']:.2f}x")
    print(f"decode step: {step * 1e3:.1f} ms measured vs {floor * 1e3:.1f} ms floor "
          f"({weight_bytes / 1e6:.0f} MB weights / {bandwidth / 1e9:.1f} GB/s copy bandwidth) "
          f"= {step / floor:.2f}x the floor")
    c = results["compute"]
    print(f"compute: {c['total_gflop']:.0f} GFLOP per run; floor {c['compute_floor_s']:.1f}s at "
          f"the measured large-matmul peak {c['matmul_peak_gflops']:.0f} GFLOP/s; achieved "
          f"{c['achieved_gflops']:.0f} GFLOP/s (a [{args.batch}x{cfg_m.hidden_size}] x "
          f"[{cfg_m.hidden_size}x{cfg_m.intermediate_size}] matmul alone: "
          f"{c['decode_shape_matmul_gflops']:.0f} GFLOP/s)")
    print(f"first run (compile + run): {jax_timing.first_s:.1f}s")
    write_results(results, args.out)
    return 0
