"""`gptflow bench train`: a GPT-2 small training step, ours against transformers', one process.

A step is forward, cross-entropy, backward and AdamW on a batch of 8 sequences of 256
tokens. Both models start from the same weights, see the same batch, use the same loss
code and the same optimizer settings, and run in fp32 and, where the CPU has native bf16,
under bf16 autocast. GPTFLOW_BENCH_STEPS sets how many timed steps (after one warmup step)
each median is taken over.
"""

import torch
import torch.nn.functional as F

from gpt_core.precision import autocast, measure_peak_flops

from .common import (
    emit,
    env_int,
    environment,
    interleaved_medians,
    precisions,
    twin_models,
)

CONTEXT, BATCH = 256, 8


def training_step(model, logits_of, inputs, targets, precision):
    # The book's pretraining settings; fused AdamW is the fastest update on CPU and GPU alike.
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1, fused=True)

    def step():
        with autocast("cpu", precision):
            loss = F.cross_entropy(logits_of(inputs).flatten(0, 1), targets.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def flops_per_token(model) -> int:
    """Training FLOPs per token: 6 per weight in a matmul plus attention's scores (PaLM, appendix B)."""
    cfg = model.cfg
    matmul_weights = model.num_parameters() - model.pos_emb.weight.numel()
    return 6 * matmul_weights + 12 * cfg.n_layers * cfg.emb_dim * CONTEXT


def main(as_json: bool = False, steps: int | None = None):
    steps = steps or env_int("GPTFLOW_BENCH_STEPS", 3)
    ours, hf = twin_models(CONTEXT)
    ours.train()
    hf.train()
    tokens = torch.randint(0, ours.cfg.vocab_size, (BATCH, CONTEXT + 1), generator=torch.Generator().manual_seed(0))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    rows = []
    for precision in precisions():
        medians, _ = interleaved_medians({
            "ours": training_step(ours, ours, inputs, targets, precision),
            "transformers": training_step(hf, lambda x: hf(input_ids=x).logits, inputs, targets, precision),
        }, steps)
        ours_rate, hf_rate = (BATCH * CONTEXT / medians[name] for name in ("ours", "transformers"))
        peak = measure_peak_flops("cpu", precision)
        rows.append({"precision": precision, "ours_tokens_per_s": round(ours_rate, 1),
                     "transformers_tokens_per_s": round(hf_rate, 1), "ratio": round(ours_rate / hf_rate, 3),
                     "ours_mfu": round(ours_rate * flops_per_token(ours) / peak, 3)})

    best_ours = max(rows, key=lambda row: row["ours_tokens_per_s"])
    best_hf = max(rows, key=lambda row: row["transformers_tokens_per_s"])
    best_ratio = best_ours["ours_tokens_per_s"] / best_hf["transformers_tokens_per_s"]
    result = {
        "bench": "train", "model": "gpt2-small, head tied to the token embedding, dropout 0",
        "batch": BATCH, "context": CONTEXT, "timed_steps": steps, "optimizer": "AdamW(fused=True)",
        "transformers_attention": hf.config._attn_implementation, **environment(), "results": rows,
        "best": {"ours": best_ours["precision"], "transformers": best_hf["precision"],
                 "ratio": round(best_ratio, 3)},
        "target_met": best_ratio >= 1.0,
    }
    heading = (f"training step, gpt2-small (tied head), batch {BATCH} x {CONTEXT} tokens, median of {steps} steps, "
               f"{result['threads']} threads, transformers attention: {result['transformers_attention']}")
    lines = [heading, f"{'precision':<10}{'ours tok/s':>12}{'hf tok/s':>12}{'ratio':>8}{'ours MFU':>10}"]
    lines += [f"{r['precision']:<10}{r['ours_tokens_per_s']:>12.1f}{r['transformers_tokens_per_s']:>12.1f}"
              f"{r['ratio']:>8.2f}{r['ours_mfu']:>10.1%}" for r in rows]
    lines.append(f"best against best: ours {best_ours['precision']} / transformers {best_hf['precision']} = "
                 f"{best_ratio:.2f} ({'meets' if result['target_met'] else 'misses'} the target of 1.0)")
    emit(result, as_json, lines)
    return result
