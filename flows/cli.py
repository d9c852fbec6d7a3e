"""gptflow: pretrain, fine-tune, judge and serve a GPT-2-class model (docs: README.md, docs/architecture.md)."""

import argparse
import functools
import importlib
import logging
import os
import sys
from importlib import metadata

from gpt_core.errors import GptflowError, user_message
from gpt_core.prompts import STYLES

from . import registry, resources
from .home import home

BENCHES = ("train", "generate", "tokenize", "ddp")
CONFIG_ACTIONS = ("show", "validate", "reference")


def _load(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


# Hours of decoding on a CPU: beyond it a number is a typo, not a request.
MAX_NEW_TOKENS = 100_000


def _new_tokens(text: str) -> int:
    value = _positive_int(text)
    if value > MAX_NEW_TOKENS:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_NEW_TOKENS}, got {value}")
    return value


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless it has none or the help already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == [] \
            or action.default == argparse.SUPPRESS
        if unset or "default" in text or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def add_sampling_options(p, max_new_tokens: int):
    p.add_argument("--max-new-tokens", type=_new_tokens, default=max_new_tokens, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="softmax temperature; 0 is greedy decoding")
    p.add_argument("--top-k", type=int, help="sample only from the K most likely tokens (default: all)")
    p.add_argument("--top-p", type=float, help="sample only from the smallest set of tokens whose probability "
                                               "reaches P (default: no cut-off)")
    p.add_argument("--seed", type=int, help="random seed for sampling (default: a fresh one each run)")


COMPILE_CHOICES = {"auto": "auto", "true": True, "false": False}


def add_compile_option(p):
    p.add_argument("--compile", choices=COMPILE_CHOICES, default="auto",
                   help="decode through torch.compile; auto: on CUDA only (on the CPU it is slower)")


class Parser(argparse.ArgumentParser):
    """A usage mistake is one line, like every other gptflow error, pointing at --help."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="gptflow", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {metadata.version('gptflow')}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_parser = functools.partial(commands.add_parser, formatter_class=HelpFormatter)

    def add_config_options(p):
        p.add_argument("--config", metavar="PROFILE",
                       help=f"a shipped profile ({', '.join(resources.profiles())}) or a YAML file "
                            f"(default: {resources.DEFAULT_PROFILE})")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one config value, e.g. --set pretrain.lr=1e-3 (repeatable)")

    def add_verbose_option(p):
        p.add_argument("--verbose", action="store_true",
                       help="show Prefect's tracebacks of a failed run, not only gptflow's one-line error")

    run = add_parser("run", help="run the whole pipeline as one Prefect flow run")
    run.add_argument("--force", action="append", default=[], metavar="STAGE",
                     help="run STAGE (and so everything downstream of it) even if cached; repeatable")
    add_config_options(run)
    add_verbose_option(run)

    deploy = add_parser("deploy", help="serve the pipeline on a cron schedule (needs a Prefect server)")
    deploy.add_argument("--cron", required=True, help='cron schedule, e.g. "0 3 * * *" for 03:00 every day')
    deploy.add_argument("--name", default="nightly", help="deployment name")
    deploy.add_argument("--timezone", default="UTC",
                        help='IANA time zone the cron schedule is read in, e.g. "Europe/Paris"')
    add_config_options(deploy)
    add_verbose_option(deploy)

    status = add_parser("status", help="each stage's latest output for a profile (reads manifests only)")
    status.add_argument("--json", action="store_true", help="print the rows as JSON")
    add_config_options(status)

    config = add_parser("config", help="a profile's resolved values, a check of one, or the reference of every key")
    config.add_argument("action", choices=CONFIG_ACTIONS,
                        help="show: the resolved configuration as YAML; validate: 'ok' or the first error; "
                             "reference: every key's meaning, default and allowed values (Markdown)")
    add_config_options(config)

    stage = add_parser("stage", help="run one pipeline stage")
    stage.add_argument("name", choices=registry.names(), help="the stage to run")
    stage.add_argument("--force", action="store_true", help="run even if an identical run is cached")
    add_config_options(stage)
    add_verbose_option(stage)

    gen = add_parser("generate", help="complete a prompt")
    gen.add_argument("--model", required=True,
                     help="model folder, Hugging Face GPT-2 folder, models:/NAME@ALIAS, or OpenAI preset name")
    gen.add_argument("prompt", help="the text to continue")
    add_sampling_options(gen, max_new_tokens=50)
    gen.add_argument("--no-cache", action="store_true", help="recompute the whole context each step")
    add_compile_option(gen)

    classify = add_parser("classify", help="spam or not spam, with probability")
    classify.add_argument("--model", required=True,
                          help="classifier folder written by the spam or lora stage, or models:/NAME@ALIAS")
    classify.add_argument("text", help="the message to classify")

    ask = add_parser("ask", help="answer an instruction with an instruction-tuned model")
    ask.add_argument("--model", required=True,
                     help="model folder written by the instruct stage, or models:/NAME@ALIAS")
    ask.add_argument("instruction", help="what the model is asked to do")
    ask.add_argument("--input", default="", help="the instruction's input text, if it has one (default: none)")
    ask.add_argument("--style", choices=STYLES,
                     help="prompt format; default: the one the model was fine-tuned with, else alpaca")
    ask.add_argument("--max-new-tokens", type=_new_tokens, default=256, help="tokens of answer at most")
    add_compile_option(ask)

    serve = add_parser("serve", help="serve a model over Ollama's API and an OpenAI-compatible one")
    serve.add_argument("--model", required=True,
                       help="model folder, Hugging Face GPT-2 folder, models:/NAME@ALIAS, or OpenAI preset name")
    serve.add_argument("--name", help="the name clients ask for (default: the folder's or registered "
                                      "model's name, tagged :latest or :ALIAS)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on; the default is this machine only")
    serve.add_argument("--port", type=int, default=11435, help="port to listen on, beside Ollama's 11434")
    serve.add_argument("--max-batch", type=_positive_int, default=8,
                       help="requests decoded together in one batch")
    serve.add_argument("--max-concurrency", type=_positive_int, default=32,
                       help="requests admitted at once, running or waiting; more get 429/503")
    serve.add_argument("--max-body-bytes", type=_positive_int, default=1 << 20,
                       help="largest request body in bytes; larger ones get 413")
    serve.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                       help="auto: the GPU when there is one")
    serve.add_argument("--threads", type=_positive_int, help="CPU threads for PyTorch (default: its own)")
    add_compile_option(serve)

    export = add_parser("export", help="write a model in Hugging Face, GGUF (llama.cpp) or Ollama form")
    export.add_argument("--model", required=True,
                        help="model folder, Hugging Face GPT-2 folder, models:/NAME@ALIAS, or OpenAI preset name")
    # Formats and dtypes are checked by gpt_core.export, which this parser does not import (it loads torch).
    export.add_argument("--format", required=True,
                        help="hf: a transformers folder; gguf: one llama.cpp file; ollama: GGUF + Modelfile")
    export.add_argument("--dtype", help="GGUF tensor type: f32 (default), f16 or q8_0")
    export.add_argument("--adapters", help="a LoRA adapter folder (the lora stage's adapters/): with hf, also "
                                           "written in PEFT's format; with gguf/ollama, merged first")
    export.add_argument("out", help="output folder (a .gguf file path for --format gguf)")

    chat = add_parser("chat", help="talk to a model in the terminal, answers streamed")
    chat.add_argument("--model", required=True,
                      help="model folder, Hugging Face GPT-2 folder, models:/NAME@ALIAS, or OpenAI preset name")
    chat.add_argument("--style", choices=STYLES,
                      help="prompt format; default: the one the model was fine-tuned with, else plain text "
                           "completion for a base model")
    chat.add_argument("--system", help="a system message (replaces alpaca's preamble)")
    add_sampling_options(chat, max_new_tokens=256)
    add_compile_option(chat)

    bench = add_parser("bench", help="side-by-side benchmark against a peer")
    bench.add_argument("which", choices=BENCHES, help="what to measure")
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _prefect_start_message(err: Exception) -> str | None:
    if "prefect" not in sys.modules:
        return None
    from .console import prefect_start_message
    return prefect_start_message(err)


def _quiet_unless_verbose(args):
    if not args.verbose:
        from .console import quiet_user_errors
        quiet_user_errors()


def cmd_stage(args):
    from .pipeline import run_stage_flow
    from .settings import load_profile
    from .stage import resolve_upstream
    profile = load_profile(args.config, args.overrides)
    # Upstream outputs are found before Prefect starts, so a missing one is one line, not a failed run.
    upstream = resolve_upstream(registry.get(args.name), profile)
    _quiet_unless_verbose(args)
    manifest = run_stage_flow(args.name, profile, upstream, force=args.force)
    if manifest.get("skipped"):
        print(f"{args.name}: skipped ({manifest['reason']})")
        return
    state = "reused (cached)" if manifest.get("cached") else "done"
    print(f"{args.name}: {state} -> {profile.data_dir / args.name / manifest['key']}")


def cmd_status(args):
    from .settings import load_profile
    from .status import report
    print(report(load_profile(args.config, args.overrides), args.json))


def cmd_config(args):
    if args.action == "reference":
        from .config_reference import reference
        print(reference(), end="")
        return
    import yaml

    from .settings import load_profile
    profile = load_profile(args.config, args.overrides)
    if args.action == "validate":
        print(f"ok: {profile.describe()}")
    else:
        print(yaml.safe_dump(profile.model_dump(mode="json"), sort_keys=False), end="")


def cmd_run(args):
    from .run_all import nothing_to_run, run_all
    from .settings import load_profile
    profile = load_profile(args.config, args.overrides)  # a bad config or stage name fails before Prefect starts
    registry.check_names(args.force)
    if nothing_to_run(profile, args.force):
        print("run: every stage's output is reused (or the stage skipped): nothing to orchestrate, so no Prefect "
              "server is started; the MLflow runs are logged as usual")
        run_all(args.config, args.overrides, args.force)
        return
    from .pipeline import pipeline_flow
    _quiet_unless_verbose(args)
    pipeline_flow(config=args.config, overrides=args.overrides, force=args.force)


def cmd_deploy(args):
    from .deploy import serve_pipeline
    _quiet_unless_verbose(args)
    serve_pipeline(args.name, args.cron, args.config, args.overrides, timezone=args.timezone)


def _decode_compiled(args, model) -> bool:
    from gpt_core.compiled import should_compile_decoding
    return should_compile_decoding(COMPILE_CHOICES[args.compile], model.tok_emb.weight.device)


def cmd_generate(args):
    from gpt_core.generate import check_sampling, generate
    from gpt_core.tokenizer import encode_with_end_of_text, get_tokenizer
    from gpt_core.weights import load_language_model
    check_sampling(args.temperature, args.top_k, args.top_p)
    model, _, _ = load_language_model(_model_folder(args.model))
    tokenizer = get_tokenizer()
    prompt = encode_with_end_of_text(tokenizer, args.prompt)
    new = generate(model, [prompt], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, seed=args.seed, use_cache=not args.no_cache,
                   compiled=_decode_compiled(args, model))[0]
    print(args.prompt + tokenizer.decode(new))


def cmd_classify(args):
    from gpt_core.classifier import classify_text
    from gpt_core.tokenizer import get_tokenizer
    from gpt_core.weights import load_model
    model, config = load_model(_model_folder(args.model))
    if not model.cfg.num_classes:
        raise GptflowError(f"{args.model} is not a classifier; pass a model written by the spam or lora stage")
    labels = config.get("labels") or [str(i) for i in range(model.cfg.num_classes)]
    label, probability = classify_text(model, get_tokenizer(), args.text,
                                       config.get("max_length") or model.cfg.context_length, labels)
    print(f"{label} ({probability:.2f})")


def cmd_ask(args):
    from gpt_core.instruct import generate_responses
    from gpt_core.tokenizer import get_tokenizer
    from gpt_core.weights import load_language_model
    if not args.instruction.strip():
        raise GptflowError("the instruction is empty: say what the model should do")
    model, config, _ = load_language_model(_model_folder(args.model))
    entry = {"instruction": args.instruction, "input": args.input}
    style = args.style or config.get("style", "alpaca")
    [answer] = generate_responses(model, get_tokenizer(), [entry], style=style, max_new_tokens=args.max_new_tokens,
                                  compiled=_decode_compiled(args, model))
    print(answer)


def _model_folder(spec: str) -> str:
    """MLflow model URIs become a downloaded folder; load_model resolves everything else."""
    if spec.startswith(("models:/", "runs:/")):
        from .tracking import resolve_model
        return resolve_model(spec)
    return spec


def cmd_serve(args):
    from .serve import registered_name, run_server
    run_server(_model_folder(args.model), host=args.host, port=args.port, name=args.name or registered_name(args.model),
               max_batch=args.max_batch, max_concurrency=args.max_concurrency, max_body_bytes=args.max_body_bytes,
               device=args.device, threads=args.threads, compile=COMPILE_CHOICES[args.compile])


def cmd_export(args):
    from gpt_core.export import export_model
    out = export_model(_model_folder(args.model), args.format, args.out, dtype=args.dtype, adapters=args.adapters)
    print(f"{args.format} export written to {out}")


def cmd_chat(args):
    from .chat import run_chat
    run_chat(_model_folder(args.model), style=args.style, system=args.system, max_new_tokens=args.max_new_tokens,
             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
             compile=COMPILE_CHOICES[args.compile])


def cmd_bench(args):
    _load(f"flows.bench.{args.which}:main")(as_json=args.json)


def main(argv=None):
    args = build_parser().parse_args(argv)
    # Usage analytics would only fail on machines without internet, with an ERROR line each run.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # gptflow's own log lines (reuse, progress, model URIs, MLflow runs) reach the Prefect run logs.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "gptflow")
    # A temporary Prefect server on a busy machine can take well over Prefect's default 20 s to start.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # The tokenizer's BPE files are cached in the working folder, so gptflow writes nowhere else.
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(home() / ".cache" / "tiktoken"))
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("gptflow").setLevel(os.environ.get("GPTFLOW_LOG", "INFO"))
    try:
        {"run": cmd_run, "deploy": cmd_deploy, "stage": cmd_stage, "status": cmd_status, "config": cmd_config,
         "generate": cmd_generate,
         "classify": cmd_classify, "ask": cmd_ask, "serve": cmd_serve, "chat": cmd_chat,
         "export": cmd_export,
         "bench": cmd_bench}[args.command](args)
    except Exception as err:
        message = user_message(err) or _prefect_start_message(err)
        if message is None:
            raise
        print(f"gptflow: error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("gptflow: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
