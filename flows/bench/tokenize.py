"""Tokenize benchmark: the tokenize stage's streaming, multi-process encoder (gpt_core.shards.tokenize_corpora)
against tiktoken's single-threaded `encode_ordinary` of the whole text, on tiny Shakespeare repeated
1x, 4x and 16x (1.1 to 17.8 MB).

The stage's speed has two sources, measured apart: its pre-tokenizer pattern (gpt_core.tokenizer;
side "encoder": our encoding's `encode_ordinary`, one thread, whole text, like the peer) and the
streaming into parallel encoder processes (sides "gptflow-1worker" and "gptflow").

Each side runs in a fresh subprocess per size so its peak resident memory (ru_maxrss, which also
sees tiktoken's Rust allocations) is its own, with the largest encoder process's beside it; both sides import the same modules, are warmed up
before the clock starts. The sides take turns over ROUNDS subprocesses each (on shared machines speed
drifts by tens of percent within seconds), and each reports its best run.
"""

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gpt_core.download import fetch, load_sources

from ..resources import SOURCES_MANIFEST

SIZES = (1, 4, 16)
# side -> tokenize_corpora workers (0: one per CPU; None: encode_ordinary of the whole text, one
# thread); the 1-worker run separates the cost of streaming and sharding from the gain of parallel
# encoders, which a busy machine hides.
KINDS = {"tiktoken": None, "encoder": None, "gptflow-1worker": 1, "gptflow": 0}
REPEATS = 2  # timed runs per subprocess, best of
ROUNDS = 3  # subprocesses per side, taking turns: a slow spell of the machine reaches every side
PEER = "tiktoken encode_ordinary, 1 thread, whole text in memory"


def _measure(kind: str, corpus: Path, work: Path) -> dict:
    """Runs inside the subprocess: tokens, seconds and peak RSS of one side on `corpus`."""
    from gpt_core.shards import tokenize_corpora
    from gpt_core.tokenizer import get_tokenizer, stock_tokenizer

    tokenizer = stock_tokenizer() if kind == "tiktoken" else get_tokenizer()

    def run(path: Path) -> int:
        if KINDS[kind] is not None:
            summary = tokenize_corpora([path], work / "shards", shard_tokens=1_000_000, val_fraction=0.1,
                                       workers=KINDS[kind], progress=False)
            return summary["train"]["tokens"] + summary["val"]["tokens"]
        return len(tokenizer.encode_ordinary(path.read_text(encoding="utf-8")))

    warm = work / "warm.txt"
    warm.write_bytes(corpus.read_bytes()[:100_000])
    run(warm)  # imports, thread pools, caches
    seconds = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        tokens = run(corpus)
        seconds.append(time.perf_counter() - started)
    return {"tokens": tokens, "seconds": min(seconds),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def _run(kind: str, corpus: Path, work: Path) -> dict:
    done = subprocess.run([sys.executable, "-m", "flows.bench.tokenize", kind, str(corpus), str(work)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def main(as_json: bool = False):
    rows = []
    with tempfile.TemporaryDirectory(prefix="gptflow-bench-tokenize-") as tmp:
        tmp = Path(tmp)
        text = fetch(load_sources(SOURCES_MANIFEST)["tinyshakespeare"], tmp / "source", progress=False).read_bytes()
        for times in SIZES:
            corpus = tmp / f"shakespeare-x{times}.txt"
            corpus.write_bytes(text * times)
            result = {"copies": times, "mb": round(corpus.stat().st_size / 1e6, 1)}
            order = list(KINDS)
            for _ in range(ROUNDS):
                for kind in order:
                    work = tmp / f"{kind}-x{times}"
                    work.mkdir(exist_ok=True)
                    run = _run(kind, corpus, work)
                    best = result.setdefault(kind, run)
                    best.update(seconds=min(best["seconds"], run["seconds"]),
                                **{k: max(best[k], run[k]) for k in ("peak_rss_mb", "worker_peak_rss_mb")})
                order.reverse()
            for kind in KINDS:
                result[kind]["tokens_per_sec"] = round(result[kind]["tokens"] / result[kind]["seconds"])
            if len({result[kind]["tokens"] for kind in KINDS}) != 1:
                raise RuntimeError(f"token counts differ at {times}x: {result}")
            for kind in list(KINDS)[1:]:
                result[kind]["speedup"] = round(result["tiktoken"]["seconds"] / result[kind]["seconds"], 2)
            rows.append(result)
            corpus.unlink()

    growth = {f"{kind}_{part}_growth_mb": round(rows[-1][kind][part] - rows[0][kind][part], 1)
              for kind in KINDS for part in ("peak_rss_mb", "worker_peak_rss_mb")}
    report = {"benchmark": "tokenize", "peer": PEER, "cpus": os.cpu_count(),
              "load_average_1m": round(os.getloadavg()[0], 2), "rows": rows,
              "speedup_largest": rows[-1]["gptflow"]["speedup"],
              "encoder_speedup_largest": rows[-1]["encoder"]["speedup"], **growth}
    if as_json:
        print(json.dumps(report))
        return
    print(f"tokenize: gptflow (streamed into shards) vs {PEER}; "
          f"load average {report['load_average_1m']} on {os.cpu_count()} CPUs")
    print("MB: peak resident memory of the process, + that of its largest encoder process")
    print(f"{'corpus':>14} {'tokens':>10} {'tiktoken tok/s':>15} {'MB':>5} {'encoder':>7} "
          f"{'gptflow 1 worker':>17} {'MB':>5} {'x':>6} {f'gptflow {os.cpu_count()} workers':>18} {'MB':>9} {'x':>6}")
    for r in rows:
        peer, encoder, one, ours = (r[kind] for kind in KINDS)
        print(f"{r['copies']:>3}x {r['mb']:>6.1f} MB {peer['tokens']:>10} {peer['tokens_per_sec']:>15,} "
              f"{peer['peak_rss_mb']:>5.0f} {encoder['speedup']:>6.2f}x {one['tokens_per_sec']:>17,} "
              f"{one['peak_rss_mb']:>5.0f} {one['speedup']:>5.2f}x {ours['tokens_per_sec']:>18,} "
              f"{ours['peak_rss_mb']:>4.0f}+{ours['worker_peak_rss_mb']:<4.0f} {ours['speedup']:>5.2f}x")


if __name__ == "__main__":
    kind, corpus, work = sys.argv[1:]
    print(json.dumps(_measure(kind, Path(corpus), Path(work))))
