"""`gptflow bench generate`: greedy decoding with GPT-2 small, ours against transformers' `generate`.

Each run decodes 200 new tokens after a 16-token prompt, batch 1, with and without the KV
cache, in fp32 and, where the CPU has native bf16, under bf16 autocast; no run stops early.
GPTFLOW_BENCH_STEPS sets how many timed runs each median is taken over (default 2: an
uncached run costs GPT-2 small ~200 forward passes of ~120 tokens) and
GPTFLOW_BENCH_NEW_TOKENS the tokens per run.
"""

import torch

from gpt_core.generate import generate
from gpt_core.precision import autocast
from gpt_core.tokenizer import END_OF_TEXT_ID

from .common import (
    emit,
    env_int,
    environment,
    interleaved_medians,
    precisions,
    twin_models,
)

PROMPT_TOKENS = 16


def runs(ours, hf, prompt, new_tokens, precision):
    """name -> a callable decoding `new_tokens` tokens and returning them."""
    def ours_run(use_cache):
        def run():
            with autocast("cpu", precision):
                return generate(ours, [prompt[0].tolist()], new_tokens, stop_id=None, use_cache=use_cache)[0]
        return run

    def hf_run(use_cache):
        def run():
            with autocast("cpu", precision):
                out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, use_cache=use_cache,
                                  pad_token_id=END_OF_TEXT_ID)
            return out[0, prompt.size(1):].tolist()
        return run

    return {"ours cached": ours_run(True), "ours uncached": ours_run(False),
            "transformers cached": hf_run(True), "transformers uncached": hf_run(False)}


def main(as_json: bool = False, steps: int | None = None, new_tokens: int | None = None):
    steps = steps or env_int("GPTFLOW_BENCH_STEPS", 2)
    new_tokens = new_tokens or env_int("GPTFLOW_BENCH_NEW_TOKENS", 200)
    ours, hf = twin_models(context_length=1024)
    ours.eval()
    hf.eval()
    prompt = torch.randint(0, ours.cfg.vocab_size, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
    rows = []
    for precision in precisions():
        # A few tokens warm every path up; a full 200-token warmup would double the runtime.
        for warm_up in runs(ours, hf, prompt, 4, precision).values():
            warm_up()
        medians, tokens = interleaved_medians(runs(ours, hf, prompt, new_tokens, precision), steps, warmup=0)
        rate = {name: new_tokens / seconds for name, seconds in medians.items()}
        rows.append({
            "precision": precision,
            **{f"{name.replace(' ', '_')}_tokens_per_s": round(value, 2) for name, value in rate.items()},
            "ours_vs_transformers_cached": round(rate["ours cached"] / rate["transformers cached"], 3),
            "ours_vs_transformers_uncached": round(rate["ours uncached"] / rate["transformers uncached"], 3),
            "ours_cache_speedup": round(rate["ours cached"] / rate["ours uncached"], 2),
            "transformers_cache_speedup": round(rate["transformers cached"] / rate["transformers uncached"], 2),
            # One set of weights decoded greedily: in fp32 every path picks the same tokens;
            # in bf16 rounding may flip a near tie and the paths drift apart from there.
            "same_tokens": len({tuple(t) for t in tokens.values()}) == 1,
        })

    result = {
        "bench": "generate", "model": "gpt2-small, head tied to the token embedding",
        "prompt_tokens": PROMPT_TOKENS, "new_tokens": new_tokens, "batch": 1, "timed_runs": steps,
        "transformers_attention": hf.config._attn_implementation, **environment(), "results": rows,
        "target_met": all(row["ours_cache_speedup"] >= 5 for row in rows),
    }
    heading = (f"greedy generation, gpt2-small, {PROMPT_TOKENS}-token prompt + {new_tokens} new tokens, batch 1, "
               f"median of {steps} runs, {result['threads']} threads, "
               f"transformers attention: {result['transformers_attention']}")
    lines = [heading, f"{'precision':<10}{'cache':<6}{'ours tok/s':>12}{'hf tok/s':>12}{'ratio':>8}"]
    for row in rows:
        for mode in ("cached", "uncached"):
            lines.append(f"{row['precision']:<10}{'yes' if mode == 'cached' else 'no':<6}"
                         f"{row[f'ours_{mode}_tokens_per_s']:>12.2f}{row[f'transformers_{mode}_tokens_per_s']:>12.2f}"
                         f"{row[f'ours_vs_transformers_{mode}']:>8.2f}")
        lines.append(f"{row['precision']:<10}cache speedup: ours {row['ours_cache_speedup']:.1f}x, "
                     f"transformers {row['transformers_cache_speedup']:.1f}x; "
                     f"same tokens on every path: {row['same_tokens']}")
    lines.append(f"target (ours cached >= 5x uncached): {'met' if result['target_met'] else 'missed'}")
    emit(result, as_json, lines)
    return result
