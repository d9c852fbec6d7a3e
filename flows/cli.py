"""The `gptflow` command line (the contract is in ARCHITECTURE.md)."""

import argparse
import importlib
import logging
import os
import sys

from gpt_core.errors import GptflowError

# stage name -> "module:function" of its Prefect flow; imported lazily (Prefect is slow to import).
STAGES = {
    "download": "flows.download:download_flow",
    "tokenize": "flows.tokenize:tokenize_flow",
    "pretrain": "flows.pretrain:pretrain_flow",
}
BENCHES = ("train", "generate", "tokenize")


def _load(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptflow", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    def add_config_options(p):
        p.add_argument("--config", help="YAML profile (default: configs/default.yaml)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one config value, e.g. --set pretrain.lr=1e-3 (repeatable)")

    stage = commands.add_parser("stage", help="run one pipeline stage")
    stage.add_argument("name", choices=list(STAGES))
    stage.add_argument("--force", action="store_true", help="run even if an identical run is cached")
    add_config_options(stage)

    gen = commands.add_parser("generate", help="complete a prompt")
    gen.add_argument("--model", required=True,
                     help="model folder, Hugging Face GPT-2 folder, models:/NAME@ALIAS, or OpenAI preset name")
    gen.add_argument("prompt")
    gen.add_argument("--max-new-tokens", type=_positive_int, default=50)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--no-cache", action="store_true", help="recompute the whole context each step")

    bench = commands.add_parser("bench", help="side-by-side benchmark against a peer")
    bench.add_argument("which", choices=BENCHES)
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def cmd_stage(args):
    from .settings import load_profile
    profile = load_profile(args.config, args.overrides)
    manifest = _load(STAGES[args.name])(profile, force=args.force)
    state = "reused (cached)" if manifest.get("cached") else "done"
    print(f"{args.name}: {state} -> {profile.data_dir / args.name / manifest['key']}")


def cmd_generate(args):
    from gpt_core.generate import check_sampling, generate
    from gpt_core.tokenizer import encode, get_tokenizer
    from gpt_core.weights import load_model
    check_sampling(args.temperature, args.top_k, args.top_p)
    spec = args.model
    if spec.startswith(("models:/", "runs:/")):
        from .tracking import resolve_model
        spec = resolve_model(spec)
    model, _ = load_model(spec)
    tokenizer = get_tokenizer()
    prompt = encode(tokenizer, args.prompt)
    new = generate(model, [prompt], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, seed=args.seed, use_cache=not args.no_cache)[0]
    print(args.prompt + tokenizer.decode(new))


def cmd_bench(args):
    _load(f"bench.{args.which}:main")(as_json=args.json)


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=os.environ.get("GPTFLOW_LOG", "INFO"), format="%(message)s")
    try:
        {"stage": cmd_stage, "generate": cmd_generate, "bench": cmd_bench}[args.command](args)
    except GptflowError as err:
        print(f"gptflow: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("gptflow: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
