"""Models that leave gptflow: Hugging Face folders, PEFT adapters, GGUF files, Ollama folders.

export_model is what `gptflow export` calls; export_hf, export_peft_adapters, export_gguf and
export_ollama take an in-memory model. The optional `gguf` package is imported only for GGUF.

Hugging Face. The tensor names are the inverse of weights.hf_to_state: GPT-2's Conv1D layers store
their weights as (in, out), so every block Linear is transposed on the way out. A classifier
becomes a GPT2ForSequenceClassification, with two differences bridged:

- HF pools the logits at the last token that is not `pad_token_id`; ours reads the last position,
  padding or not. With `pad_token_id: -1`, an id no text ever contains, HF reads the last position
  too (transformers logs once that -1 is outside the vocabulary; that is the point). The tokenizer
  still pads with <|endoftext|> to the classifier's max_length, as our SpamDataset does.
- HF's `score` head has no bias; ours has one. The final LayerNorm feeds nothing but the head, so
  the bias is folded into the norm's bias: W (g*x + c + d) = W (g*x + c) + b for d = pinv(W) b.
  Logits are unchanged; the last hidden state is shifted by the constant d.

PEFT. Ours compute linear(x) + s * (x @ A @ B) with A: (in, r), B: (r, out), s = alpha / r; PEFT's
lora_A is nn.Linear(in, r) (weight (r, in)) and lora_B nn.Linear(r, out) (weight (out, r)), with
the same s: its weights are our matrices transposed, whether the base layer is GPT-2's Conv1D
(`fan_in_fan_out` only matters when PEFT merges) or nn.Linear (lm_head). On the token embedding
PEFT keeps lora_embedding_A (r, vocab) and lora_embedding_B (dim, r), again ours transposed. A
classifier's head is new, not part of the base model, so it travels whole in `modules_to_save`
(`score`), any LoRA update of it merged in, and `ln_f` with it for the folded bias.

GGUF. Names, shapes and keys follow llama.cpp's gpt2 loader (src/models/gpt2.cpp) and its HF
converter (conversion/gpt2.py, conversion/base.py):

- keys gpt2.{context_length, embedding_length, feed_forward_length, block_count,
  attention.head_count, attention.layer_norm_epsilon}; all are required.
- tensors token_embd, position_embd, blk.N.{attn_norm, attn_qkv, attn_output, ffn_norm, ffn_up,
  ffn_down} (each .weight and .bias; attn_qkv.bias is required, so a qkv_bias=False model gets
  zeros), output_norm, and output.weight, which llama.cpp takes from token_embd when it is absent
  (a tied head). A GGUF shape is the numpy shape reversed, so nn.Linear's (out, in) weight is
  already the {in, out} llama.cpp expects: no transpose, unlike GPT-2's Conv1D. The fused qkv is
  split as ours is: q, k, v blocks of emb_dim rows, heads contiguous in each.
- tokenizer: model "gpt2", pre-tokenizer "gpt-2" (GPT-2's split pattern; without it llama.cpp
  falls back to another), the tokens of encoder.json in id order (<|endoftext|> a CONTROL
  token), the merges of vocab.bpe, bos = eos = 50256 (llama.cpp's gpt2 default is 11), and no
  BOS added, as we never add one.
- types as the converter picks them: 1-D tensors, norms and position_embd stay f32; the other
  matrices become f16 or q8_0, and one q8_0 cannot take (rows not a multiple of 32) f16.

Ollama. The Modelfile's TEMPLATE is built from prompts.format_prompt itself, so a chat sends the
model the very text it was fine-tuned on: each user message goes where format_prompt puts the
instruction, and the prompt ends with the response header; an earlier answer is followed by
<|endoftext|>, as in training. (Ollama has one message where we have an instruction and an
optional input: a phi3 input is the message's next line, an alpaca input needs its "### Input:"
header typed into the message.) A model without a prompt style gets Ollama's plain
`{{ .Prompt }}`. Syntax, from Ollama's parser (parser/parser.go): one `COMMAND value` per line; a
value with newlines or quotes goes in triple quotes and cannot contain three quotes itself;
PARAMETER names are letters, digits and underscores. Templates are Go text/template, where `{{`
starts an action, so literal text must not contain it.
"""

import hashlib
import json
import shutil
import typing
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from .classifier import add_classification_head
from .errors import GptflowError
from .files import atomic_output, atomic_write_bytes, atomic_write_json
from .lora import (
    ADAPTERS_CONFIG,
    ADAPTERS_FILE,
    LoRAEmbedding,
    LoRALinear,
    load_adapters,
    lora_modules,
    merge_lora,
)
from .prompts import format_prompt
from .tokenizer import _BPE_BASE, BPE_FILES, END_OF_TEXT, END_OF_TEXT_ID, seed_bpe_cache
from .weights import load_model, save_tensors

Format = Literal["hf", "gguf", "ollama"]
FORMATS = typing.get_args(Format)
Dtype = Literal["f32", "f16", "q8_0"]
DTYPES = typing.get_args(Dtype)
GPT2_VOCAB = 50257  # tokens in GPT-2's BPE (the last one is END_OF_TEXT)
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which every GPTModel norm uses
# Our module names inside trf_blocks.N -> GPT-2's (Hugging Face) and llama.cpp's.
HF_BLOCK = {"norm1": "ln_1", "att.qkv": "attn.c_attn", "att.out_proj": "attn.c_proj", "norm2": "ln_2",
            "ff.layers.0": "mlp.c_fc", "ff.layers.2": "mlp.c_proj"}
GGUF_BLOCK = {"norm1": "attn_norm", "att.qkv": "attn_qkv", "att.out_proj": "attn_output", "norm2": "ffn_norm",
              "ff.layers.0": "ffn_up", "ff.layers.2": "ffn_down"}
CONV1D = ("att.qkv", "att.out_proj", "ff.layers.0", "ff.layers.2")  # stored (in, out) by GPT-2
NEVER_A_TOKEN = -1  # pad_token_id of an exported classifier: HF then pools at the last position
PEFT_PREFIX = "base_model.model."
BASE_DIR, ADAPTER_DIR = "base", "adapter"
GGUF_NAME, MODELFILE = "model.gguf", "Modelfile"
# Ollama decodes as `gptflow ask` and `gptflow generate` do: greedy, no repetition penalty
# (Ollama's default is 1.1), and their default answer lengths.
OLLAMA_TEMPERATURE = 0
OLLAMA_ANSWER_TOKENS = {"instruct": 256, "complete": 50}
_MARK = "\x00"  # stands for the instruction in a prompt template; no template contains it


# --- What every exporter reads -------------------------------------------------------------------

@dataclass(frozen=True)
class ModelFacts:
    num_classes: int | None  # a classifier's class count; None for a language model
    labels: list[str] | None  # class names, index = class id
    style: str | None  # prompt style an instruct model was fine-tuned with
    max_length: int | None  # the length a classifier pads its texts to


def model_facts(model: nn.Module, config: dict | None = None) -> ModelFacts:
    """The one place that reads what a model is beyond its weights.

    `config` is the model folder's config.json (or an adapter folder's adapters.json). The class
    count is the model config's (`num_classes`, saved under config.json["model"]), read from the
    model when it has its head, else from the saved config; labels, style and max_length are
    top-level in config.json.
    """
    config = config or {}
    num_classes = model.cfg.num_classes or (config.get("model") or {}).get("num_classes")
    labels = config.get("labels")
    if num_classes and labels is not None and len(labels) != num_classes:
        raise GptflowError(f"the config lists {len(labels)} labels for a head with {num_classes} classes")
    if num_classes and labels is None:
        labels = [str(i) for i in range(num_classes)]
    return ModelFacts(num_classes or None, list(labels) if num_classes else None,
                      config.get("style"), config.get("max_length"))


def bpe_file(name: str) -> Path:
    """GPT-2's `encoder.json` or `vocab.bpe`, checksum-verified, from the tokenizer's cache (which
    the tokenizer seeds, from GPTFLOW_MIRROR offline, under the SHA-1 of the file's URL)."""
    if name not in dict(BPE_FILES):
        raise ValueError(f"not a GPT-2 BPE file: {name}")
    return seed_bpe_cache() / hashlib.sha1((_BPE_BASE + name).encode()).hexdigest()


def check_exportable(model: nn.Module, what: str):
    """A plain GPTModel with GPT-2's vocabulary: no unmerged LoRA, no smaller vocabulary."""
    if lora_modules(model):
        raise GptflowError(
            f"the model has unmerged LoRA adapters; merge them first (gpt_core.lora.merge_lora) to write "
            f"{what}, or export the adapters alone with export_peft_adapters")
    if model.cfg.vocab_size < GPT2_VOCAB:
        raise GptflowError(
            f"the model's vocabulary ({model.cfg.vocab_size}) is smaller than GPT-2's tokenizer "
            f"({GPT2_VOCAB} tokens), so no GPT-2 tokenizer can go with it in {what}")


def head_is_tied(model: nn.Module) -> bool:
    """Whether the output head really shares the token embedding (not what the config claims)."""
    embedding = getattr(model.tok_emb, "embedding", model.tok_emb)
    head = getattr(model.out_head, "linear", model.out_head)
    return head.weight is embedding.weight


def bias_of(linear: nn.Linear) -> torch.Tensor:
    """The layer's bias, or zeros for a layer built without one (qkv_bias=False)."""
    if linear.bias is not None:
        return linear.bias.detach()
    return torch.zeros(linear.out_features, dtype=linear.weight.dtype, device=linear.weight.device)


# --- Hugging Face --------------------------------------------------------------------------------

def fold_head_bias(head: nn.Linear, norm: nn.LayerNorm) -> torch.Tensor:
    """The final norm's bias with the head's bias folded in (see the module docstring)."""
    weight, bias, norm_bias = head.weight.detach(), head.bias, norm.bias.detach()
    if bias is None:
        return norm_bias.clone()
    bias = bias.detach()
    folded = (norm_bias.double() + torch.linalg.pinv(weight.double()) @ bias.double()).to(norm_bias.dtype)
    # In the norm's own precision the fold must still give back the bias.
    if (weight @ (folded - norm_bias) - bias).abs().max().item() > 1e-5 * (1 + bias.abs().max().item()):
        raise GptflowError(
            "cannot export the classifier: Hugging Face's GPT-2 head has no bias and this head's bias "
            "cannot be folded into the final norm (its weight rows are linearly dependent)")
    return folded


def hf_state(model: nn.Module, *, classifier: bool = False, with_head: bool = True) -> dict[str, torch.Tensor]:
    """Our weights under GPT-2's names: transformer.*, plus lm_head (untied) or score (classifier)."""
    tensors = {"transformer.wte.weight": model.tok_emb.weight, "transformer.wpe.weight": model.pos_emb.weight,
               "transformer.ln_f.weight": model.final_norm.weight, "transformer.ln_f.bias": model.final_norm.bias}
    for index, block in enumerate(model.trf_blocks):
        for ours, theirs in HF_BLOCK.items():
            module = block.get_submodule(ours)
            weight = module.weight.detach()
            tensors[f"transformer.h.{index}.{theirs}.weight"] = weight.t() if ours in CONV1D else weight
            tensors[f"transformer.h.{index}.{theirs}.bias"] = bias_of(module)
    if classifier:
        if with_head:
            tensors["score.weight"] = model.out_head.weight
            tensors["transformer.ln_f.bias"] = fold_head_bias(model.out_head, model.final_norm)
    elif not head_is_tied(model):
        tensors["lm_head.weight"] = model.out_head.weight
    return {name: tensor.detach().cpu() for name, tensor in tensors.items()}


def hf_config(model: nn.Module, facts: ModelFacts) -> dict:
    cfg = model.cfg
    config = {
        "architectures": ["GPT2ForSequenceClassification" if facts.num_classes else "GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.context_length, "n_ctx": cfg.context_length,
        "n_embd": cfg.emb_dim, "n_head": cfg.n_heads, "n_layer": cfg.n_layers, "n_inner": None,
        "activation_function": "gelu_new",  # the tanh approximation, as nn.GELU(approximate="tanh")
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "resid_pdrop": cfg.drop_rate, "embd_pdrop": cfg.drop_rate, "attn_pdrop": cfg.drop_rate,
        "initializer_range": 0.02, "scale_attn_weights": True, "use_cache": True,
        "bos_token_id": END_OF_TEXT_ID, "eos_token_id": END_OF_TEXT_ID,
        "tie_word_embeddings": head_is_tied(model) and not facts.num_classes,
        "torch_dtype": str(model.tok_emb.weight.dtype).removeprefix("torch."),
        "gptflow": {key: value for key, value in (("style", facts.style), ("max_length", facts.max_length))
                    if value is not None},
    }
    if facts.num_classes:
        config.update({
            "num_labels": facts.num_classes, "problem_type": "single_label_classification",
            "id2label": {str(i): label for i, label in enumerate(facts.labels)},
            "label2id": {label: i for i, label in enumerate(facts.labels)},
            "pad_token_id": NEVER_A_TOKEN,
        })
    return config


def write_tokenizer(out: Path, max_length: int, pad: bool = False):
    """vocab.json and merges.txt (the BPE files as they are), tokenizer.json, and their configs.

    `max_length` becomes model_max_length; `pad` makes <|endoftext|> the padding token, so that
    tokenizer(text, padding="max_length", truncation=True) pads as SpamDataset does.
    """
    shutil.copyfile(bpe_file("encoder.json"), out / "vocab.json")
    shutil.copyfile(bpe_file("vocab.bpe"), out / "merges.txt")
    _write_tokenizer_json(out)
    special = {"bos_token": END_OF_TEXT, "eos_token": END_OF_TEXT, "unk_token": END_OF_TEXT}
    if pad:
        special["pad_token"] = END_OF_TEXT
    atomic_write_json(out / "special_tokens_map.json", special)
    atomic_write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "GPT2Tokenizer", "model_max_length": max_length,
        "add_prefix_space": False, "add_bos_token": False, "errors": "replace",
        # Decoding gives back the text exactly, as tiktoken does: no " ." -> "." clean-up.
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {str(END_OF_TEXT_ID): {
            "content": END_OF_TEXT, "lstrip": False, "rstrip": False, "normalized": True,
            "single_word": False, "special": True}},
        **special,
    })


def _write_tokenizer_json(out: Path):
    """tokenizer.json for the fast tokenizer: byte-level BPE over the same vocab and merges.

    Skipped without the `tokenizers` package: transformers then builds the same tokenizer from
    vocab.json and merges.txt.
    """
    try:
        from tokenizers import (
            AddedToken,
            Tokenizer,
            decoders,
            models,
            pre_tokenizers,
            processors,
        )
    except ImportError:
        return
    vocab = json.loads((out / "vocab.json").read_text(encoding="utf-8"))
    lines = (out / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_special_tokens([AddedToken(END_OF_TEXT, special=True, normalized=True)])
    tokenizer.save(str(out / "tokenizer.json"))


def write_hf_folder(model: nn.Module, facts: ModelFacts, out_dir: str | Path, *, with_head: bool = True) -> Path:
    """config.json, model.safetensors and the tokenizer files. `with_head=False` leaves a
    classifier's head out: the base that a PEFT adapter with its own head goes on."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    classifier = bool(facts.num_classes)
    save_tensors(hf_state(model, classifier=classifier, with_head=with_head), out / "model.safetensors",
                 {"format": "pt"})
    atomic_write_json(out / "config.json", hf_config(model, facts))
    write_tokenizer(out, (classifier and facts.max_length) or model.cfg.context_length, pad=classifier)
    return out


def export_hf(model: nn.Module, config: dict | None, out_dir: str | Path) -> Path:
    """Write `model` as a Hugging Face GPT-2 folder; `config` is its folder's config.json (or None).

    A language model becomes a GPT2LMHeadModel (tie_word_embeddings as its head really is), a
    classifier a GPT2ForSequenceClassification. Returns `out_dir`.
    """
    check_exportable(model, "a Hugging Face folder")
    return write_hf_folder(model, model_facts(model, config), out_dir)


# --- PEFT ----------------------------------------------------------------------------------------

def _hf_module(name: str, classifier: bool) -> str:
    """GPT-2's module name for one of our LoRA-wrapped modules."""
    if name == "tok_emb":
        return "transformer.wte"
    if name == "out_head":
        return "score" if classifier else "lm_head"
    blocks, index, part = name.split(".", 2)
    if blocks != "trf_blocks" or part not in HF_BLOCK:
        raise GptflowError(f"cannot export LoRA on {name}: it has no counterpart in Hugging Face's GPT-2")
    return f"transformer.h.{index}.{HF_BLOCK[part]}"


def _target_modules(names: list[str], n_layers: int) -> list[str]:
    """PEFT target_modules for these HF module names, as short as stays exact: a block module
    targeted in every layer by its leaf name ("c_attn"; "attn.c_proj" where only one of the two
    c_proj is), any other by its full name."""
    layers_of: dict[str, set[str]] = {}
    targets = set()
    for name in names:
        if name.startswith("transformer.h."):
            index, suffix = name.removeprefix("transformer.h.").split(".", 1)
            layers_of.setdefault(suffix, set()).add(index)
        else:
            targets.add(name.rsplit(".", 1)[-1])  # wte, lm_head
    everywhere = {suffix for suffix, layers in layers_of.items() if len(layers) == n_layers}
    for suffix, layers in layers_of.items():
        if suffix not in everywhere:
            targets |= {f"transformer.h.{i}.{suffix}" for i in layers}
    for suffix in everywhere:
        leaf = suffix.rsplit(".", 1)[-1]
        namesakes = [s for s in HF_BLOCK.values() if s.rsplit(".", 1)[-1] == leaf]
        targets.add(leaf if all(s in everywhere for s in namesakes) else suffix)
    return sorted(targets)


def read_adapters_config(folder: Path) -> dict:
    try:
        return json.loads((Path(folder) / ADAPTERS_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise GptflowError(f"cannot read LoRA adapters in {folder}: {err}") from None


def load_lora_model(folder: str | Path, base) -> tuple[nn.Module, dict]:
    """The base model (a model, or a folder or preset to load) with the adapters of `folder`
    loaded, not merged; and the folder's adapters.json."""
    folder = Path(folder)
    if base is None:
        raise GptflowError(f"exporting the adapters in {folder} needs the base model they were trained on")
    adapters_config = read_adapters_config(folder)
    try:
        saved = load_file(str(folder / ADAPTERS_FILE))
    except (OSError, SafetensorError) as err:
        raise GptflowError(f"cannot read LoRA adapters in {folder}: {err}") from None
    extra = sorted(n for n in saved if ".lora_" not in n and not n.startswith("out_head."))
    if extra:
        raise GptflowError(f"the adapters in {folder} also hold {extra[0]}, which neither PEFT's LoRA format "
                           f"nor a merge into the base can carry as such (they take LoRA matrices and a "
                           f"classifier head)")
    model = load_model(base)[0] if isinstance(base, str | Path) else base
    num_classes = model_facts(model, adapters_config).num_classes
    if num_classes and not model_facts(model).num_classes:
        add_classification_head(model, num_classes)
    load_adapters(model, folder)
    return model.eval(), adapters_config


def _merged_head(model: nn.Module) -> nn.Linear:
    """The classifier head with any LoRA update folded in, as a new nn.Linear."""
    wrapped = model.out_head
    linear = getattr(wrapped, "linear", wrapped)
    head = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                     dtype=linear.weight.dtype)
    with torch.no_grad():
        head.weight.copy_(linear.weight)
        if isinstance(wrapped, LoRALinear):
            head.weight += wrapped.delta().t()
        if linear.bias is not None:
            head.bias.copy_(linear.bias)
    return head


def export_peft_adapters(source: nn.Module | str | Path, out_dir: str | Path, *, base=None,
                         config: dict | None = None, base_model_name_or_path: str | None = None) -> Path:
    """Write PEFT's adapter_config.json + adapter_model.safetensors for a LoRA model.

    source: a model with (unmerged) LoRA modules, or an adapter folder written by
    lora.save_adapters, which needs `base`, the model (or its folder or preset) it was trained on.
    config: the model folder's config.json or adapters.json, for a classifier's labels.
    base_model_name_or_path: where the Hugging Face export of the base lives, for PEFT's Auto classes.
    """
    if isinstance(source, nn.Module):
        model = source
    else:
        model, config = load_lora_model(source, base)
    classifier = bool(model_facts(model, config).num_classes)
    loras = lora_modules(model)
    if not loras:
        raise GptflowError("the model has no LoRA adapters to export")
    head = {id(p) for p in model.out_head.parameters()} if classifier else set()
    for name, param in model.named_parameters():
        if param.requires_grad and ".lora_" not in name and id(param) not in head:
            raise GptflowError(f"{name} is trained outside the adapters; PEFT's LoRA format carries only "
                               f"LoRA matrices and a classifier head")

    tensors, ranks, alphas = {}, {}, {}
    for name, lora in loras.items():
        if classifier and name == "out_head":
            continue  # merged into the head, which travels whole (below)
        hf = _hf_module(name, classifier)
        a, b = lora.lora_A.detach().t(), lora.lora_B.detach().t()
        kind = ("lora_embedding_A", "lora_embedding_B") if isinstance(lora, LoRAEmbedding) else \
            ("lora_A.weight", "lora_B.weight")
        tensors[f"{PEFT_PREFIX}{hf}.{kind[0]}"], tensors[f"{PEFT_PREFIX}{hf}.{kind[1]}"] = a, b
        # PEFT scales by lora_alpha / r: this alpha gives each adapter its own scale, book's or standard.
        ranks[hf], alphas[hf] = lora.rank, lora.scale * lora.rank
    if not ranks:
        raise GptflowError("the model has LoRA only on its classifier head; export the merged model instead")
    modules_to_save = None
    if classifier:
        merged = _merged_head(model)
        tensors[f"{PEFT_PREFIX}score.weight"] = merged.weight.detach()
        tensors[f"{PEFT_PREFIX}transformer.ln_f.weight"] = model.final_norm.weight.detach()
        tensors[f"{PEFT_PREFIX}transformer.ln_f.bias"] = fold_head_bias(merged, model.final_norm)
        modules_to_save = ["score", "ln_f"]

    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    targets = _target_modules(list(ranks), model.cfg.n_layers)
    # rank_pattern / alpha_pattern key a module that differs from the common r / alpha (the
    # embedding's own rank) by its target name.
    target_of = {hf: next(t for t in targets if hf == t or hf.endswith("." + t)) for hf in ranks}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_tensors({k: v.cpu() for k, v in tensors.items()}, out / "adapter_model.safetensors", {"format": "pt"})
    atomic_write_json(out / "adapter_config.json", {
        "peft_type": "LORA", "task_type": "SEQ_CLS" if classifier else "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank, "lora_alpha": alpha,
        "rank_pattern": {target_of[hf]: r for hf, r in ranks.items() if r != rank},
        "alpha_pattern": {target_of[hf]: a for hf, a in alphas.items() if a != alpha},
        "target_modules": targets, "modules_to_save": modules_to_save,
        "fan_in_fan_out": True,  # GPT-2's Conv1D; PEFT switches it off itself for lm_head (nn.Linear)
        "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True,
    })
    return out


# --- GGUF ----------------------------------------------------------------------------------------

def _gguf():
    try:
        import gguf
    except ImportError:
        raise GptflowError("GGUF export needs the gguf package: pip install 'gptflow[export]'") from None
    return gguf


def gguf_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our weights under llama.cpp's gpt2 names, in the layout it reads, as float32."""
    tensors = {"token_embd.weight": model.tok_emb.weight, "position_embd.weight": model.pos_emb.weight}
    for index, block in enumerate(model.trf_blocks):
        for ours, theirs in GGUF_BLOCK.items():
            module = block.get_submodule(ours)
            tensors[f"blk.{index}.{theirs}.weight"] = module.weight
            tensors[f"blk.{index}.{theirs}.bias"] = bias_of(module)
    tensors["output_norm.weight"] = model.final_norm.weight
    tensors["output_norm.bias"] = model.final_norm.bias
    if not head_is_tied(model):
        tensors["output.weight"] = model.out_head.weight
    return {name: t.detach().float().cpu() for name, t in tensors.items()}


def _gguf_vocabulary(gguf, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    encoder = json.loads(bpe_file("encoder.json").read_text(encoding="utf-8"))
    by_id = {i: token for token, i in encoder.items()}
    if sorted(by_id) != list(range(GPT2_VOCAB)):
        raise GptflowError("encoder.json is not GPT-2's 50257-token vocabulary")
    # Rows past GPT-2's tokens (a vocabulary padded for speed) get placeholders, as the converter's.
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [gguf.TokenType.CONTROL if i == END_OF_TEXT_ID else
             gguf.TokenType.NORMAL if i in by_id else gguf.TokenType.UNUSED for i in range(vocab_size)]
    lines = bpe_file("vocab.bpe").read_text(encoding="utf-8").splitlines()
    return tokens, types, [line for line in lines if line and not line.startswith("#version")]


def gguf_data(gguf, name: str, data: np.ndarray, dtype: str):
    """(array, type) as llama.cpp's converter stores this tensor for this file type."""
    if dtype == "f32" or data.ndim <= 1 or name.endswith("_norm.weight") or name.startswith("position_embd."):
        return data, gguf.GGMLQuantizationType.F32
    if dtype == "q8_0":
        try:
            return gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
        except gguf.QuantError:
            pass  # rows not a multiple of 32 long: f16, as the converter falls back
    return data.astype(np.float16), gguf.GGMLQuantizationType.F16


def export_gguf(model: nn.Module, out_path: str | Path, dtype: str = "f32", *, name: str = "gptflow",
                config: dict | None = None) -> Path:
    """Write `model` as one GGUF file for llama.cpp's gpt2 architecture; dtype f32, f16 or q8_0."""
    if dtype not in DTYPES:
        raise GptflowError(f"GGUF dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if model_facts(model, config).num_classes:
        raise GptflowError("a classifier cannot be exported to GGUF: llama.cpp's gpt2 has no classification head")
    check_exportable(model, "a GGUF file")
    gguf = _gguf()
    cfg = model.cfg
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    tokens, types, merges = _gguf_vocabulary(gguf, cfg.vocab_size)
    out_path = Path(out_path)
    with atomic_output(out_path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "gpt2")
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name)
        writer.add_context_length(cfg.context_length)
        writer.add_embedding_length(cfg.emb_dim)
        writer.add_feed_forward_length(4 * cfg.emb_dim)
        writer.add_block_count(cfg.n_layers)
        writer.add_head_count(cfg.n_heads)
        writer.add_layer_norm_eps(LAYER_NORM_EPS)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(END_OF_TEXT_ID)
        writer.add_eos_token_id(END_OF_TEXT_ID)
        writer.add_add_bos_token(False)
        writer.add_add_eos_token(False)
        for tensor_name, tensor in gguf_tensors(model).items():
            data, qtype = gguf_data(gguf, tensor_name, tensor.numpy(), dtype)
            writer.add_tensor(tensor_name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out_path


# --- Ollama --------------------------------------------------------------------------------------

def prompt_parts(style: str) -> tuple[str, str]:
    """(text before, text after) the instruction in a `style` prompt, response header included."""
    before, after = format_prompt({"instruction": _MARK}, style).split(_MARK)
    return before, after


def chat_template(style: str | None) -> str:
    """Ollama's TEMPLATE for a model fine-tuned with prompt `style` (None: plain completion)."""
    if style is None:
        return "{{ .Prompt }}"
    before, after = prompt_parts(style)
    if any("{{" in text or '"""' in text for text in (before, after)):
        raise GptflowError(f"the {style} prompt cannot go into an Ollama template: it holds '{{{{' or '\"\"\"'")
    return ('{{ range .Messages }}{{ if eq .Role "user" }}' + before + "{{ .Content }}" + after
            + '{{ else if eq .Role "assistant" }}{{ .Content }}' + END_OF_TEXT + "{{ end }}{{ end }}")


def stop_words(style: str | None) -> list[str]:
    """<|endoftext|>, and for an instruct model the headers that would start another turn."""
    if style is None:
        return [END_OF_TEXT]
    before, after = prompt_parts(style)
    headers = (before.strip().splitlines()[-1].strip(), after.strip())
    return [END_OF_TEXT, *dict.fromkeys(h for h in headers if h)]


def modelfile(style: str | None, context_length: int, gguf_name: str = GGUF_NAME) -> str:
    """The Modelfile text for a GGUF file beside it."""
    stops = stop_words(style)
    if any('"' in word or "\n" in word for word in stops):
        raise GptflowError(f"the stop words {stops} cannot all be written as Ollama parameters")
    lines = [
        "# Written by gptflow. Use: ollama create NAME -f Modelfile && ollama run NAME",
        f"FROM ./{gguf_name}",
        f'TEMPLATE """{chat_template(style)}"""',
        *(f'PARAMETER stop "{word}"' for word in stops),
        f"PARAMETER temperature {OLLAMA_TEMPERATURE}",
        "PARAMETER repeat_penalty 1",
        f"PARAMETER num_ctx {context_length}",
        f"PARAMETER num_predict {OLLAMA_ANSWER_TOKENS['instruct' if style else 'complete']}",
    ]
    return "\n".join(lines) + "\n"


def export_ollama(model: nn.Module, out_dir: str | Path, dtype: str = "f32", *, config: dict | None = None,
                  name: str = "gptflow") -> Path:
    """Write out_dir/model.gguf and out_dir/Modelfile; the prompt style comes from `config`."""
    out = Path(out_dir)
    text = modelfile(model_facts(model, config).style, model.cfg.context_length)  # fail before writing
    out.mkdir(parents=True, exist_ok=True)
    export_gguf(model, out / GGUF_NAME, dtype, name=name, config=config)
    atomic_write_bytes(out / MODELFILE, text.encode())
    return out


# --- export_model --------------------------------------------------------------------------------

def _fresh_folder(out: Path):
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise GptflowError(f"{out} already exists and is not an empty folder; choose a new output folder")


def export_model(spec_or_folder: str | Path, fmt: str, out: str | Path, *, dtype: str | None = None,
                 adapters: str | Path | None = None) -> Path:
    """Export a model folder (ours or HF GPT-2) or OpenAI preset as `fmt` to `out`; returns what it wrote.

    hf: `out` becomes a Hugging Face GPT-2 folder. With `adapters` (a LoRA adapter folder trained
    on this model), `out/base` gets the model and `out/adapter` the adapters in PEFT's format.
    gguf: `out` is the .gguf file (MODEL.gguf inside `out` if it is a folder); dtype f32 (the
    default), f16 or q8_0. ollama: `out` becomes a folder with model.gguf and a Modelfile.
    For gguf and ollama, `adapters` are merged into the model first.
    """
    if fmt not in FORMATS:
        raise GptflowError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if dtype is not None and fmt == "hf" and dtype != "f32":
        raise GptflowError("a Hugging Face export keeps the model's own precision; dtype is for gguf and ollama")
    if dtype is not None and dtype not in DTYPES:
        raise GptflowError(f"GGUF dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out = Path(out)
    if fmt != "gguf":
        _fresh_folder(out)
    name = Path(str(spec_or_folder)).name or "gptflow"
    model, config = load_model(spec_or_folder)
    model.eval()
    if adapters is not None and fmt == "hf":
        return _export_hf_with_adapters(model, config, Path(adapters), out)
    if adapters is not None:
        model, adapters_config = load_lora_model(adapters, model)
        merge_lora(model)
        config = {**config, **adapters_config}
    if fmt == "hf":
        return export_hf(model, config, out)
    if fmt == "gguf":
        return export_gguf(model, out / f"{name}.gguf" if out.is_dir() else out, dtype or "f32",
                           name=name, config=config)
    return export_ollama(model, out, dtype or "f32", config=config, name=name)


def _export_hf_with_adapters(model: nn.Module, config: dict, adapters: Path, out: Path) -> Path:
    check_exportable(model, "a Hugging Face folder")
    facts_config = {**config, **read_adapters_config(adapters)}
    base_out = out / BASE_DIR
    # The base as the adapters see it, written before they are loaded into it: for a classifier a
    # GPT2ForSequenceClassification without a head, since the trained head travels in the adapter.
    write_hf_folder(model, model_facts(model, facts_config), base_out, with_head=False)
    lora_model, _ = load_lora_model(adapters, model)
    export_peft_adapters(lora_model, out / ADAPTER_DIR, config=facts_config,
                         base_model_name_or_path=str(base_out.resolve()))
    return out
