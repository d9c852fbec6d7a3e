"""`gptflow bench train`: GPT-2 small training steps, ours against transformers' and the book's.

A step is forward, cross-entropy, backward and AdamW on a batch of 8 sequences of 256 tokens,
every side from the same weights on the same batch with the same optimizer settings, in fp32
and, where the CPU has native bf16, under bf16 autocast. Each side runs its own best way of
computing the loss: ours through `GPTModel(idx, targets=)` (gpt_core.loss), the peers from
their full logits.

- GPT-2's shape (head tied to the token embedding, dropout 0): ours eager and compiled against
  transformers' GPT2LMHeadModel (SDPA attention).
- The book's shape (its own output head, no query/key/value bias, dropout 0.1): ours, eager and
  compiled, against the book's own `GPTModel` from the `llms-from-scratch` package (chapter 4),
  when it is installed. It declares TensorFlow and numpy<2.1 as dependencies that its GPTModel
  does not use, so it is installed on its own: `pip install --no-deps llms-from-scratch==1.0.19`.

Compiled sides compile once, before timing, and that time is reported on its own.
GPTFLOW_BENCH_STEPS sets how many timed steps each median is taken over (after one warmup step).
"""

import torch
import torch.nn.functional as F

from gpt_core.compiled import compile_seconds
from gpt_core.config import get_preset
from gpt_core.model import GPTModel
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
BOOK_PACKAGE = "llms-from-scratch==1.0.19"


def training_step(model, loss_of, inputs, targets, precision):
    # The book's pretraining settings; fused AdamW is the fastest update on CPU and GPU alike.
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1, fused=True)

    def step():
        with autocast("cpu", precision):
            loss = loss_of(inputs, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def ours_loss(model):
    return lambda inputs, targets: model(inputs, targets=targets)


def logits_loss(logits_of):
    return lambda inputs, targets: F.cross_entropy(logits_of(inputs).flatten(0, 1).float(), targets.flatten())


def compiled_step(model, inputs, targets, precision) -> tuple:
    """A step of `model` under torch.compile, compiled now: (the step, seconds spent compiling)."""
    step = training_step(model, ours_loss(torch.compile(model)), inputs, targets, precision)
    before = compile_seconds()
    step()
    return step, compile_seconds() - before


def flops_per_token(model) -> int:
    """Training FLOPs per token: 6 per weight in a matmul plus attention's scores (PaLM, appendix B)."""
    cfg = model.cfg
    matmul_weights = model.num_parameters() - model.pos_emb.weight.numel()
    return 6 * matmul_weights + 12 * cfg.n_layers * cfg.emb_dim * CONTEXT


def book_twins():
    """Ours in the book's GPT_CONFIG_124M shape and the book's GPTModel with the same weights, or
    (ours, None) when the package is not installed."""
    torch.manual_seed(0)
    ours = GPTModel(get_preset("gpt2-small", context_length=CONTEXT, tie_weights=False, qkv_bias=False,
                               drop_rate=0.1), init="pytorch")
    try:
        from llms_from_scratch.ch04 import GPTModel as BookGPTModel
    except ImportError:
        return ours, None
    cfg = ours.cfg
    book = BookGPTModel({"vocab_size": cfg.vocab_size, "context_length": CONTEXT, "emb_dim": cfg.emb_dim,
                         "n_heads": cfg.n_heads, "n_layers": cfg.n_layers, "drop_rate": cfg.drop_rate,
                         "qkv_bias": False})
    book.load_state_dict(to_book_state(ours), strict=False)  # strict=False: the book's causal-mask buffers
    ours.eval(), book.eval()
    probe = torch.randint(0, cfg.vocab_size, (1, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(probe), book(probe), rtol=1e-4, atol=1e-4)
    return ours.train(), book.train()


def to_book_state(model: GPTModel) -> dict:
    """Our weights under the book's chapter 4 names: separate W_query/W_key/W_value, norms'
    scale/shift."""
    state = {}
    for name, tensor in model.state_dict().items():
        name = name.replace("norm1.weight", "norm1.scale").replace("norm1.bias", "norm1.shift")
        name = name.replace("norm2.weight", "norm2.scale").replace("norm2.bias", "norm2.shift")
        name = name.replace("final_norm.weight", "final_norm.scale").replace("final_norm.bias", "final_norm.shift")
        if name.endswith("att.qkv.weight"):
            prefix = name.removesuffix("qkv.weight")
            for part, chunk in zip(("W_query", "W_key", "W_value"), tensor.chunk(3)):
                state[f"{prefix}{part}.weight"] = chunk
            continue
        state[name] = tensor
    return state


def main(as_json: bool = False, steps: int | None = None):
    steps = steps or env_int("GPTFLOW_BENCH_STEPS", 3)
    ours, hf = twin_models(CONTEXT)
    ours.train()
    hf.train()
    book_ours, book = book_twins()
    tokens = torch.randint(0, ours.cfg.vocab_size, (BATCH, CONTEXT + 1), generator=torch.Generator().manual_seed(0))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    rows = []
    rate = lambda seconds: BATCH * CONTEXT / seconds  # noqa: E731
    for precision in precisions():
        sides = {"ours": training_step(ours, ours_loss(ours), inputs, targets, precision),
                 "transformers": training_step(hf, logits_loss(lambda x: hf(input_ids=x).logits), inputs, targets,
                                               precision)}
        sides["ours compiled"], compiling = compiled_step(ours, inputs, targets, precision)
        sides["ours book shape"] = training_step(book_ours, ours_loss(book_ours), inputs, targets, precision)
        sides["ours book shape compiled"], _ = compiled_step(book_ours, inputs, targets, precision)
        if book is not None:
            sides["book"] = training_step(book, logits_loss(book), inputs, targets, precision)
        medians, _ = interleaved_medians(sides, steps)
        peak = measure_peak_flops("cpu", precision)
        row = {"precision": precision, "compile_seconds": round(compiling, 1), "peak_tflops": round(peak / 1e12, 3)}
        row.update({f"{name.replace(' ', '_')}_tokens_per_s": round(rate(seconds), 1)
                    for name, seconds in medians.items()})
        for name in ("ours", "ours compiled"):
            row[f"{name.replace(' ', '_')}_mfu"] = round(rate(medians[name]) * flops_per_token(ours) / peak, 3)
        rows.append(row)

    def best(key):
        return max(rows, key=lambda row: row.get(key) or 0.0)

    best_ours = max((row[key], row["precision"], key) for row in rows
                    for key in ("ours_tokens_per_s", "ours_compiled_tokens_per_s"))
    best_hf = best("transformers_tokens_per_s")
    best_row = next(row for row in rows if row["precision"] == best_ours[1])
    summary = {"ours_best": {"tokens_per_s": best_ours[0], "precision": best_ours[1],
                             "compiled": best_ours[2] == "ours_compiled_tokens_per_s",
                             # Of its own precision's peak: fp32 runs near its low peak, bf16 far below its high one.
                             "mfu": best_row[best_ours[2].replace("tokens_per_s", "mfu")]},
               "vs_transformers_best": round(best_ours[0] / best_hf["transformers_tokens_per_s"], 3)}
    book_ours_best = max(row[key] for row in rows
                         for key in ("ours_book_shape_tokens_per_s", "ours_book_shape_compiled_tokens_per_s"))
    if book is not None:
        book_fp32 = rows[0]["book_tokens_per_s"]
        summary.update({"book_shape_vs_book_fp32": round(book_ours_best / book_fp32, 3),
                        "book_shape_vs_book_best": round(book_ours_best / best("book_tokens_per_s")["book_tokens_per_s"],
                                                         3)})
    result = {"bench": "train", "batch": BATCH, "context": CONTEXT, "timed_steps": steps,
              "optimizer": "AdamW(fused=True)", "transformers_attention": hf.config._attn_implementation,
              "book_package": BOOK_PACKAGE if book is not None else None, **environment(), "results": rows,
              "summary": summary}
    emit(result, as_json, report_lines(result))
    return result


def report_lines(result: dict) -> list[str]:
    rows, summary = result["results"], result["summary"]
    lines = [f"training step, gpt2-small, batch {result['batch']} x {result['context']} tokens, median of "
             f"{result['timed_steps']} steps, {result['threads']} threads, transformers attention: "
             f"{result['transformers_attention']}",
             "GPT-2 shape (tied head, dropout 0):",
             f"{'precision':<10}{'ours':>9}{'compiled':>10}{'hf':>9}{'ours/hf':>9}{'MFU':>7}{'MFU comp.':>10}"
             f"{'compile s':>10}"]
    lines += [f"{r['precision']:<10}{r['ours_tokens_per_s']:>9.1f}{r['ours_compiled_tokens_per_s']:>10.1f}"
              f"{r['transformers_tokens_per_s']:>9.1f}{r['ours_tokens_per_s'] / r['transformers_tokens_per_s']:>9.2f}"
              f"{r['ours_mfu']:>7.1%}{r['ours_compiled_mfu']:>10.1%}{r['compile_seconds']:>10.1f}" for r in rows]
    best = summary["ours_best"]
    lines.append(f"best against best: ours {best['precision']}{' compiled' if best['compiled'] else ''} "
                 f"{best['tokens_per_s']:.1f} tok/s = {summary['vs_transformers_best']:.2f}x transformers' best; "
                 f"its MFU {best['mfu']:.1%} of the measured {best['precision']} matmul peak")
    lines.append("the book's shape (own head, no qkv bias, dropout 0.1), tok/s:")
    for r in rows:
        book = f", the book's GPTModel {r['book_tokens_per_s']:.1f}" if "book_tokens_per_s" in r else ""
        lines.append(f"  {r['precision']:<8} ours {r['ours_book_shape_tokens_per_s']:.1f}, compiled "
                     f"{r['ours_book_shape_compiled_tokens_per_s']:.1f}{book}")
    if "book_shape_vs_book_fp32" in summary:
        lines.append(f"  ours best = {summary['book_shape_vs_book_fp32']:.2f}x the book's fp32, "
                     f"{summary['book_shape_vs_book_best']:.2f}x the book's best")
    else:
        lines.append(f"  the book's GPTModel: not installed (pip install --no-deps {BOOK_PACKAGE})")
    return lines
