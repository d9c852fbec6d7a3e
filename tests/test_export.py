"""Exports checked by their real consumers: transformers, peft, llama.cpp; Ollama's Modelfile rules."""

import json
import re

import numpy as np
import pytest
import torch

from gpt_core.classifier import SpamDataset, add_classification_head, classify_logits
from gpt_core.config import get_preset
from gpt_core.errors import GptflowError
from gpt_core.export import (
    export_gguf,
    export_hf,
    export_model,
    export_ollama,
    export_peft_adapters,
    gguf_data,
    gguf_tensors,
    prompt_parts,
)
from gpt_core.generate import generate
from gpt_core.lora import (
    LoRAEmbedding,
    LoRALinear,
    LoraSettings,
    inject_lora,
    merge_lora,
    save_adapters,
)
from gpt_core.model import GPTModel
from gpt_core.prompts import format_prompt
from gpt_core.tokenizer import encode_with_end_of_text, get_tokenizer
from gpt_core.weights import load_model, save_model

PROMPT = [464, 3290, 318]  # "The dog is"
MIXED_TEXT = ("Hello, world! It's 2024 -- they're here.\n\n"
              "def f(x):\n\treturn x ** 2  # square\n    \n"
              "Ünïcödé: naïve café, 東京, Привет, emoji 🚀🙂, NBSP\u00a0here, ideographic\u3000space\n"
              "<|endoftext|>trailing   spaces   ")


def varied_model(**overrides) -> GPTModel:
    """A random gpt-nano whose greedy tokens vary: strong positional embeddings keep a tied head
    from repeating the last token."""
    torch.manual_seed(0)
    model = GPTModel(get_preset("gpt-nano", **overrides)).eval()
    with torch.no_grad():
        model.pos_emb.weight.normal_(std=5 * model.tok_emb.weight.std().item())
    return model


def classifier_model(labels=("ham", "spam")) -> GPTModel:
    model = varied_model()
    torch.manual_seed(1)
    add_classification_head(model, len(labels))
    with torch.no_grad():
        model.out_head.bias.normal_(std=1.0)  # a bias HF's head cannot hold: it must be folded
    return model.eval()


def randomize_lora(model, std=0.2):
    torch.manual_seed(2)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear | LoRAEmbedding):
                module.lora_B.normal_(std=std)


def token_batch(batch=2, n=12):
    return torch.randint(0, 50257, (batch, n), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


# --- Hugging Face --------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [{}, {"tie_weights": False}, {"qkv_bias": False}],
                         ids=["tied", "untied", "no-qkv-bias"])
def test_transformers_computes_our_logits_and_greedy_tokens(tmp_path, transformers, overrides):
    model = varied_model(**overrides)
    export_hf(model, None, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["tie_word_embeddings"] == model.cfg.tie_weights
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert (hf.lm_head.weight is hf.transformer.wte.weight) == model.cfg.tie_weights
    if not model.cfg.tie_weights:
        assert torch.equal(hf.lm_head.weight, model.out_head.weight)
    x = token_batch()
    with torch.no_grad():
        assert (hf(x).logits - model(x)).abs().max().item() <= 1e-4
        theirs = hf.generate(torch.tensor([PROMPT]), max_new_tokens=30, do_sample=False,
                             pad_token_id=50256)[0, len(PROMPT):].tolist()
    ours = generate(model, [PROMPT], 30)[0]
    assert len(ours) == 30 and len(set(ours)) > 10
    assert theirs == ours


def test_our_loader_reads_the_export_back(tmp_path):
    """hf_to_state, which imports GPT-2 checkpoints, undoes the export exactly."""
    model = varied_model(tie_weights=False)
    export_hf(model, None, tmp_path)
    again, _ = load_model(tmp_path)
    x = token_batch()
    with torch.no_grad():
        assert torch.equal(again.eval()(x), model(x))


def test_autotokenizer_encodes_like_ours(tmp_path, transformers):
    export_hf(varied_model(), None, tmp_path)
    assert {"vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json"} <= {p.name for p in tmp_path.iterdir()}
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = encode_with_end_of_text(get_tokenizer(), MIXED_TEXT)
    assert 50256 in ours
    assert hf_tokenizer.encode(MIXED_TEXT) == ours
    assert hf_tokenizer.decode(ours) == MIXED_TEXT


def test_spam_classifier_becomes_gpt2_for_sequence_classification(tmp_path, transformers):
    model = classifier_model()
    export_hf(model, {"labels": ["ham", "spam"], "max_length": 16}, tmp_path)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == "GPT2ForSequenceClassification"
    assert hf.config.num_labels == 2 and hf.config.id2label == {0: "ham", 1: "spam"}
    texts = ["Free entry! Win a prize now", "see you at lunch", "Call 0800 now to claim <|endoftext|>"]
    data = SpamDataset(texts, [1, 0, 1], get_tokenizer(), max_length=16)
    ids = torch.stack([data[i][0] for i in range(len(data))])
    assert (ids == 50256).any(), "the batch must hold padding, which HF would otherwise skip"
    # The exported tokenizer truncates and pads as SpamDataset does.
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    hf_ids = hf_tokenizer(texts, padding="max_length", truncation=True, split_special_tokens=True)["input_ids"]
    assert hf_ids == ids.tolist()
    with torch.no_grad():
        ours = classify_logits(model, ids)
        theirs = hf(input_ids=ids).logits  # no attention_mask: ours lets padding be attended to
    assert (theirs - ours).abs().max().item() <= 1e-4
    assert torch.allclose(theirs.softmax(-1), ours.softmax(-1), atol=1e-5)


def test_a_head_bias_that_cannot_be_folded_is_a_user_error(tmp_path):
    model = classifier_model()
    with torch.no_grad():
        model.out_head.weight[1] = model.out_head.weight[0]
        model.out_head.bias.copy_(torch.tensor([0.0, 1.0]))
    with pytest.raises(GptflowError, match="no bias"):
        export_hf(model, None, tmp_path)


def test_unmerged_lora_is_refused_by_the_full_model_exports(tmp_path):
    model = varied_model()
    inject_lora(model, LoraSettings(rank=2, alpha=4))
    with pytest.raises(GptflowError, match="merge them first"):
        export_hf(model, None, tmp_path / "hf")


# --- PEFT ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def peft():
    return pytest.importorskip("peft")


@pytest.mark.parametrize("targets, embedding_rank, scaling, expected", [
    ("all", 2, "standard", ["c_attn", "c_fc", "c_proj", "lm_head", "wte"]),
    ("all", 2, "book", ["c_attn", "c_fc", "c_proj", "lm_head", "wte"]),
    ("attention", None, "standard", ["attn.c_proj", "c_attn"]),
], ids=["all+embedding", "all+embedding-book-scaling", "attention"])
def test_peft_loads_our_lm_adapters(tmp_path, transformers, peft, targets, embedding_rank, scaling, expected):
    model = varied_model()
    export_hf(model, None, tmp_path / "base")
    inject_lora(model, LoraSettings(rank=4, alpha=8, scaling=scaling, targets=targets,
                                    embedding_rank=embedding_rank))
    randomize_lora(model)
    export_peft_adapters(model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == expected and config["fan_in_fan_out"] is True
    # PEFT scales by lora_alpha / r: the book's scale (alpha) needs lora_alpha = alpha * r, per rank.
    assert config["r"] == 4 and config["lora_alpha"] == (8 * 4 if scaling == "book" else 8)
    assert config["rank_pattern"] == ({"wte": 2} if embedding_rank else {})
    assert config["alpha_pattern"] == ({"wte": 8 * 2} if scaling == "book" else {})

    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    hf = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    x = token_batch()
    with torch.no_grad():
        ours = model.eval()(x)
        assert (hf(input_ids=x).logits - ours).abs().max().item() <= 1e-4
        # The adapters matter: without them the logits differ.
        with hf.disable_adapter():
            assert (hf(input_ids=x).logits - ours).abs().max().item() > 1e-2


def test_peft_loads_a_lora_classifier_exported_from_its_folders(tmp_path, transformers, peft):
    """The lora stage's outputs: a base model folder and an adapter folder with a trained head."""
    base = varied_model()
    save_model(base, tmp_path / "pretrained")
    model = classifier_model()
    inject_lora(model, LoraSettings(rank=4, alpha=8, embedding_rank=2))
    randomize_lora(model)
    info = {"labels": ["ham", "spam"], "max_length": 16, "stage": "lora"}
    save_adapters(model, tmp_path / "adapters", info)

    out = export_model(tmp_path / "pretrained", "hf", tmp_path / "export", adapters=tmp_path / "adapters")
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score", "ln_f"]
    assert "score" not in config["target_modules"]
    hf = peft.AutoPeftModelForSequenceClassification.from_pretrained(out / "adapter").eval()
    ids = torch.stack([row for row, _ in SpamDataset(["win cash now", "hi mum"], [1, 0], get_tokenizer(),
                                                     max_length=16)])
    with torch.no_grad():
        ours = classify_logits(model.eval(), ids)
        assert (hf(input_ids=ids).logits - ours).abs().max().item() <= 1e-4


def test_adapters_folder_without_a_base_is_a_user_error(tmp_path):
    model = varied_model()
    inject_lora(model, LoraSettings(rank=2, alpha=4))
    save_adapters(model, tmp_path / "adapters")
    with pytest.raises(GptflowError, match="base model"):
        export_peft_adapters(tmp_path / "adapters", tmp_path / "out")


# --- GGUF ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gguf():
    return pytest.importorskip("gguf")


def test_gguf_holds_llama_cpp_gpt2_names_keys_and_types(tmp_path, gguf):
    model = varied_model(tie_weights=False, qkv_bias=False)
    reader = gguf.GGUFReader(export_gguf(model, tmp_path / "m.gguf", "q8_0"))  # slow: 100k strings

    def value(key):
        return reader.fields[key].contents()

    assert value("general.architecture") == "gpt2" and value("general.file_type") == 7
    assert value("gpt2.context_length") == 64 and value("gpt2.embedding_length") == 32
    assert value("gpt2.feed_forward_length") == 128 and value("gpt2.block_count") == 2
    assert value("gpt2.attention.head_count") == 2
    assert value("gpt2.attention.layer_norm_epsilon") == pytest.approx(1e-5)
    assert value("tokenizer.ggml.model") == "gpt2" and value("tokenizer.ggml.pre") == "gpt-2"
    assert value("tokenizer.ggml.bos_token_id") == 50256 == value("tokenizer.ggml.eos_token_id")
    assert value("tokenizer.ggml.add_bos_token") is False
    tokens = value("tokenizer.ggml.tokens")
    assert len(tokens) == 50257 and tokens[50256] == "<|endoftext|>" and tokens[220] == "Ġ"
    assert value("tokenizer.ggml.token_type")[50256] == gguf.TokenType.CONTROL
    assert value("tokenizer.ggml.merges")[0] == "Ġ t"
    tensors = {t.name: t for t in reader.tensors}
    per_block = {f"blk.{i}.{part}.{kind}" for i in range(2) for kind in ("weight", "bias")
                 for part in ("attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down")}
    assert set(tensors) == per_block | {"token_embd.weight", "position_embd.weight", "output_norm.weight",
                                        "output_norm.bias", "output.weight"}
    # GGUF lists shapes innermost first: {n_embd, 3 n_embd} for the fused qkv, as llama.cpp loads it.
    assert list(tensors["blk.0.attn_qkv.weight"].shape) == [32, 96]
    assert list(tensors["blk.0.ffn_down.weight"].shape) == [128, 32]
    assert not tensors["blk.0.attn_qkv.bias"].data.any()  # qkv_bias=False: zeros
    for name in ("blk.1.ffn_up.weight", "token_embd.weight", "output.weight"):
        assert tensors[name].tensor_type.name == "Q8_0", name
    for name in ("position_embd.weight", "blk.1.ffn_up.bias", "blk.0.attn_norm.weight", "output_norm.weight"):
        assert tensors[name].tensor_type.name == "F32", name


def test_gguf_types_follow_llama_cpp_converter(gguf):
    matrix, odd = np.zeros((64, 32), np.float32), np.zeros((64, 40), np.float32)
    types = {(name, dtype): gguf_data(gguf, name, data, dtype)[1].name
             for name, data in (("blk.0.ffn_up.weight", matrix), ("blk.0.ffn_up.odd", odd),
                                ("position_embd.weight", matrix), ("blk.0.ffn_up.bias", matrix[0]))
             for dtype in ("f32", "f16", "q8_0")}
    assert [types["blk.0.ffn_up.weight", d] for d in ("f32", "f16", "q8_0")] == ["F32", "F16", "Q8_0"]
    assert types["blk.0.ffn_up.odd", "q8_0"] == "F16"  # rows of 40: q8_0 blocks are 32 long
    assert {types["position_embd.weight", d] for d in ("f16", "q8_0")} == {"F32"}
    assert {types["blk.0.ffn_up.bias", d] for d in ("f16", "q8_0")} == {"F32"}


def test_tied_head_leaves_output_to_llama_cpp():
    assert "output.weight" not in gguf_tensors(varied_model())
    assert "output.weight" in gguf_tensors(varied_model(tie_weights=False))


def test_classifiers_and_bad_dtypes_cannot_go_to_gguf(tmp_path):
    with pytest.raises(GptflowError, match="classifier cannot be exported to GGUF"):
        export_gguf(classifier_model(), tmp_path / "c.gguf")
    with pytest.raises(GptflowError, match="f32, f16, q8_0"):
        export_gguf(varied_model(), tmp_path / "m.gguf", "q4_0")
    assert not list(tmp_path.iterdir())


# --- llama.cpp -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_cpp():
    module = pytest.importorskip("llama_cpp")
    if b"AMX_INT8 = 1" not in module.llama_print_system_info():
        yield module
        return
    # Where llama.cpp was built with AMX, it repacks weights into AMX buffers whose quantized
    # matmul segfaults (ggml-org/llama.cpp#20824, open; any q8_0 file, the q8_0 export included).
    # Plain CPU buffers decode the same file.
    default_params = module.llama_cpp.llama_model_default_params

    def without_extra_buffers():
        params = default_params()
        params.use_extra_bufts = False
        return params
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module.llama_cpp, "llama_model_default_params", without_extra_buffers)
        yield module


def llama(llama_cpp, path, **kwargs):
    return llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=2, verbose=False, seed=0, **kwargs)


def llama_greedy(llm, prompt, n):
    tokens = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        if token == llm.token_eos() or len(tokens) == n:
            break
        tokens.append(token)
    return tokens


@pytest.mark.parametrize("overrides", [{}, {"tie_weights": False, "qkv_bias": False}], ids=["tied", "untied"])
def test_llama_cpp_decodes_the_f32_export_as_we_do(tmp_path, gguf, llama_cpp, overrides):
    model = varied_model(**overrides)
    llm = llama(llama_cpp, export_gguf(model, tmp_path / "m.gguf", "f32"), logits_all=True)
    ours = generate(model, [PROMPT], 32)[0]
    assert len(ours) == 32 and len(set(ours)) > 10
    assert llama_greedy(llm, PROMPT, 32) == ours
    llm.reset()
    llm.eval(PROMPT)
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT]))[0]
    assert (torch.tensor(llm.scores[:len(PROMPT)]) - logits).abs().max().item() <= 1e-4
    # And its tokenizer splits text as ours does.
    ours = encode_with_end_of_text(get_tokenizer(), MIXED_TEXT)
    assert llm.tokenize(MIXED_TEXT.encode(), add_bos=False, special=True) == ours


def test_llama_cpp_runs_the_f16_and_q8_0_exports(tmp_path, gguf, llama_cpp):
    model = varied_model()
    ours = generate(model, [PROMPT], 32)[0]
    with torch.no_grad():
        reference = model(torch.tensor([PROMPT]))[0, -1]
    scale = reference.abs().max().item()
    # Rounded weights: the first tokens the same, the next-token logits close (measured: f16
    # 0.04% of the largest logit, all 32 tokens the same; q8_0 0.9%, 11 to 24 tokens).
    for dtype, tokens, tolerance in (("f16", 8, 0.01), ("q8_0", 4, 0.05)):
        llm = llama(llama_cpp, export_gguf(model, tmp_path / f"{dtype}.gguf", dtype), logits_all=True)
        assert llama_greedy(llm, PROMPT, 32)[:tokens] == ours[:tokens], dtype
        llm.reset()
        llm.eval(PROMPT)
        theirs = torch.tensor(llm.scores[len(PROMPT) - 1])
        assert (theirs - reference).abs().max().item() <= tolerance * scale, dtype


# --- Ollama --------------------------------------------------------------------------------------

COMMANDS = ("from", "license", "template", "system", "adapter", "draft", "renderer", "parser", "parameter",
            "message", "requires")


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(command, value) pairs by the rules of Ollama's parser/parser.go: comments start with #, a
    command is letters then a space, PARAMETER adds a [A-Za-z0-9_]+ name, and a value runs to the
    end of the line unless quoted ("..." or \"\"\"...\"\"\", which may span lines)."""
    commands, rest = [], text
    while rest:
        rest = rest.lstrip(" \t\r\n")
        if not rest:
            break
        if rest.startswith("#"):
            rest = rest.partition("\n")[2]
            continue
        match = re.match(r"([A-Za-z]+)[ \t]+", rest)
        assert match and match[1].lower() in COMMANDS, f"not a Modelfile command: {rest[:30]!r}"
        name, rest = match[1].lower(), rest[match.end():]
        if name == "parameter":
            match = re.match(r"([A-Za-z0-9_]+)[ \t]+", rest)
            assert match, f"bad parameter: {rest[:30]!r}"
            name, rest = match[1], rest[match.end():]
        for quote in ('"""', '"'):
            if rest.startswith(quote):
                end = rest.find(quote, len(quote))
                assert end >= 0, "unterminated quote"
                value, rest = rest[len(quote):end], rest[end + len(quote):]
                assert rest.partition("\n")[0].strip() == "", "text after a quoted value"
                break
        else:
            value, _, rest = rest.partition("\n")
            value = value.strip()
        commands.append((name, value))
    return commands


def render_chat(template: str, user: str, earlier: list[tuple[str, str]] = ()) -> str:
    """Ollama's rendering of our template for a chat whose last message is `user`."""
    match = re.fullmatch(r'\{\{ range \.Messages \}\}\{\{ if eq \.Role "user" \}\}(.*)\{\{ \.Content \}\}(.*)'
                         r'\{\{ else if eq \.Role "assistant" \}\}\{\{ \.Content \}\}(.*)\{\{ end \}\}\{\{ end \}\}',
                         template, re.DOTALL)
    assert match, template
    before, after, end_of_answer = match.groups()
    turns = [before + q + after + a + end_of_answer for q, a in earlier]
    return "".join(turns) + before + user + after


@pytest.mark.parametrize("style", ["alpaca", "phi3"])
def test_ollama_folder_prompts_as_the_model_was_fine_tuned(tmp_path, gguf, style):
    model = varied_model()
    out = export_ollama(model, tmp_path / "ollama", config={"style": style})
    assert (out / "model.gguf").is_file()
    commands = parse_modelfile((out / "Modelfile").read_text())
    values = {}
    for name, value in commands:
        values.setdefault(name, []).append(value)
    assert values["from"] == ["./model.gguf"]
    assert values["num_ctx"] == ["64"] and values["temperature"] == ["0"]
    instruction = "Name a colour."
    expected = format_prompt({"instruction": instruction}, style)
    [template] = values["template"]
    assert render_chat(template, instruction) == expected
    assert render_chat(template, "Next?", [(instruction, "Blue.")]) == (
        format_prompt({"instruction": instruction}, style) + "Blue.<|endoftext|>"
        + format_prompt({"instruction": "Next?"}, style))
    before, after = prompt_parts(style)
    assert values["stop"][0] == "<|endoftext|>"
    assert set(values["stop"][1:]) == {before.strip().splitlines()[-1], after.strip()}


def test_ollama_completes_plain_text_for_a_base_model(tmp_path, gguf):
    out = export_model_folder(tmp_path, "ollama")
    commands = dict(parse_modelfile((out / "Modelfile").read_text()))
    assert commands["template"] == "{{ .Prompt }}"


# --- export_model --------------------------------------------------------------------------------

def export_model_folder(tmp_path, fmt, **kwargs):
    save_model(varied_model(), tmp_path / "model", {"stage": "pretrain"})
    return export_model(tmp_path / "model", fmt, tmp_path / fmt, **kwargs)


def test_export_model_writes_each_format(tmp_path, gguf):
    assert (export_model_folder(tmp_path, "hf") / "config.json").is_file()
    path = export_model(tmp_path / "model", "gguf", tmp_path / "m.gguf", dtype="f16")
    assert path == tmp_path / "m.gguf" and path.stat().st_size > 0
    folder = tmp_path / "gguf_folder"
    folder.mkdir()
    assert export_model(tmp_path / "model", "gguf", folder) == folder / "model.gguf"
    # A spam stage's folder: its labels and padded length go with the classifier.
    save_model(classifier_model(), tmp_path / "spam", {"labels": ["ham", "spam"],
                                                      "max_length": 16})
    spam = export_model(tmp_path / "spam", "hf", tmp_path / "spam_hf")
    config = json.loads((spam / "config.json").read_text())
    assert config["id2label"] == {"0": "ham", "1": "spam"} and config["pad_token_id"] == -1
    assert json.loads((spam / "tokenizer_config.json").read_text())["model_max_length"] == 16


def test_export_model_merges_lm_adapters_for_gguf(tmp_path, gguf):
    base = varied_model()
    save_model(base, tmp_path / "base")
    inject_lora(base, LoraSettings(rank=2, alpha=4))
    randomize_lora(base)
    save_adapters(base, tmp_path / "adapters")
    before = base.trf_blocks[0].att.qkv.linear.weight.detach().numpy().tobytes()
    after = merge_lora(base).trf_blocks[0].att.qkv.weight.detach().numpy().tobytes()
    path = export_model(tmp_path / "base", "gguf", tmp_path / "m.gguf", adapters=tmp_path / "adapters")
    data = path.read_bytes()  # f32 tensors are stored as they are, row by row
    assert after in data and before not in data


@pytest.mark.parametrize("call, message", [
    (lambda p: export_model(p / "model", "onnx", p / "x"), "unknown export format"),
    (lambda p: export_model(p / "model", "gguf", p / "x", dtype="q2"), "f32, f16, q8_0"),
    (lambda p: export_model(p / "model", "hf", p / "x", dtype="f16"), "own precision"),
    (lambda p: export_model(p / "nowhere", "hf", p / "x"), "no model at"),
    (lambda p: export_model(p / "model", "hf", p / "model"), "not an empty folder"),
    (lambda p: export_model(p / "spam", "gguf", p / "x.gguf"), "classifier cannot be exported to GGUF"),
])
def test_export_model_input_errors_are_one_line(tmp_path, call, message):
    save_model(varied_model(), tmp_path / "model")
    save_model(classifier_model(), tmp_path / "spam", {"labels": ["ham", "spam"]})
    with pytest.raises(GptflowError, match=message) as err:
        call(tmp_path)
    assert "\n" not in str(err.value)
