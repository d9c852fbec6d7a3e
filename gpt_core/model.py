"""GPTModel: the GPT-2 architecture as the book builds it, with SDPA and a KV cache.

token embedding + positional embedding -> dropout -> N transformer blocks
(pre-LayerNorm masked multi-head attention and feed forward, each with a residual
connection) -> final norm -> output head.
"""

import math
import typing
from dataclasses import replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .errors import GptflowError
from .loss import logits_loss, vocabulary_loss


class KVCache:
    """Keys and values of every layer for the tokens processed so far, preallocated.

    Attention reads the filled part (`static=False`), or always the whole buffer with the unfilled
    rest masked (`static=True`): then every decode step has the same shapes, which a compiled
    decode step needs to be compiled once, not once per length.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, device, dtype, max_length: int | None = None,
                 static: bool = False):
        self.max_length = max_length or cfg.context_length
        shape = (cfg.n_layers, batch_size, cfg.n_heads, self.max_length, cfg.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0
        self.static = static

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor):
        end = self.length + keys.size(2)
        self.keys[layer, :, :, self.length:end] = keys
        self.values[layer, :, :, self.length:end] = values
        if self.static:
            return self.keys[layer], self.values[layer]
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


# On the CPU, SDPA with dropout leaves its fused kernel for one that forms every full score matrix:
# 2.3x slower than without dropout at gpt2-small's shape. Attending one block of queries at a time
# to only the keys it can see keeps a block's scores small and skips the masked half; 1.3x (fp32)
# and 1.75x (bf16) faster than SDPA's dropout path (fwd + bwd, 8 x 12 heads x 256 tokens). CUDA's
# fused kernels do dropout themselves.
BLOCKED_DROPOUT_ON_CPU = True
QUERY_BLOCK = 64


def blocked_causal_attention(queries, keys, values, dropout_p: float):
    """Causal attention with dropout on the attention weights, query block by query block."""
    n_tokens = queries.size(-2)
    scale = 1 / math.sqrt(queries.size(-1))
    blocks = []
    for start in range(0, n_tokens, QUERY_BLOCK):
        end = min(n_tokens, start + QUERY_BLOCK)
        scores = (queries[..., start:end, :] @ keys[..., :end, :].transpose(-2, -1)) * scale
        hidden = torch.arange(end, device=queries.device) > torch.arange(start, end, device=queries.device)[:, None]
        weights = torch.softmax(scores.masked_fill(hidden, float("-inf")), dim=-1)
        blocks.append(F.dropout(weights, dropout_p) @ values[..., :end, :])
    return torch.cat(blocks, dim=-2)


class MultiHeadAttention(nn.Module):
    """Masked multi-head self-attention with one fused query/key/value projection."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.head_dim
        self.dropout = cfg.drop_rate
        self.qkv = nn.Linear(cfg.emb_dim, 3 * cfg.emb_dim, bias=cfg.qkv_bias)
        self.out_proj = nn.Linear(cfg.emb_dim, cfg.emb_dim)

    def forward(self, x, mask=None, cache: KVCache | None = None, layer: int = 0):
        batch, n_tokens, emb_dim = x.shape
        qkv = self.qkv(x).view(batch, n_tokens, 3, self.n_heads, self.head_dim)
        queries, keys, values = qkv.permute(2, 0, 3, 1, 4)
        if cache is not None:
            keys, values = cache.append(layer, keys, values)
        # Without an explicit mask the causal case is square (training, or a prefill
        # into an empty cache); a single new token may attend to every cached key.
        is_causal = mask is None and n_tokens > 1
        dropout_p = self.dropout if self.training else 0.0
        if dropout_p > 0 and is_causal and cache is None and x.device.type == "cpu" and BLOCKED_DROPOUT_ON_CPU:
            context = blocked_causal_attention(queries, keys, values, dropout_p)
        else:
            context = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, is_causal=is_causal,
                                                     dropout_p=dropout_p)
        context = context.transpose(1, 2).reshape(batch, n_tokens, emb_dim)
        return self.out_proj(context)


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim),
            nn.GELU(approximate="tanh"),  # GPT-2's GELU
            nn.Linear(4 * cfg.emb_dim, cfg.emb_dim),
        )

    def forward(self, x):
        return self.layers(x)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.emb_dim)
        self.att = MultiHeadAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.emb_dim)
        self.ff = FeedForward(cfg)
        self.drop_shortcut = nn.Dropout(cfg.drop_rate)

    def forward(self, x, mask=None, cache: KVCache | None = None, layer: int = 0):
        x = x + self.drop_shortcut(self.att(self.norm1(x), mask, cache, layer))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


Init = Literal["gpt2", "pytorch"]
INIT_SCHEMES = typing.get_args(Init)


class GPTModel(nn.Module):
    """init: "gpt2" (normal(0, 0.02), residual projections scaled by depth; what GPT-2 and nanoGPT
    use, best for longer training) or "pytorch" (each layer's own default, as the book's GPTModel
    is built: N(0, 1) embeddings, which memorise a small corpus such as the-verdict far faster).
    """

    def __init__(self, cfg: ModelConfig, init: str = "gpt2"):
        super().__init__()
        if init not in INIT_SCHEMES:
            raise GptflowError(f"unknown init '{init}'; choose one of: {', '.join(INIT_SCHEMES)}")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.trf_blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(cfg.emb_dim)
        self.out_head = self._output_head(cfg)
        if init == "gpt2":
            self._init_gpt2(cfg)

    def _output_head(self, cfg: ModelConfig) -> nn.Linear:
        """The vocabulary projection (tied to the token embedding if cfg says so), or the book's
        classification head: a plain nn.Linear with bias, from the final norm to the classes."""
        like = self.tok_emb.weight
        if cfg.num_classes is not None:
            return nn.Linear(cfg.emb_dim, cfg.num_classes, device=like.device, dtype=like.dtype)
        head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False, device=like.device, dtype=like.dtype)
        if cfg.tie_weights:
            head.weight = self.tok_emb.weight
        return head

    def replace_head(self, num_classes: int) -> "GPTModel":
        """Swap the vocabulary head for a fresh classification head of `num_classes`, in place.

        The config records it, so a saved model describes its own head.
        """
        self.cfg = replace(self.cfg, tie_weights=False, num_classes=num_classes)
        self.out_head = self._output_head(self.cfg)
        return self

    def _init_gpt2(self, cfg: ModelConfig):
        self.apply(self._init_weights)
        # GPT-2 scales the projections that write into the residual stream by 1/sqrt(2N)
        # so the stream's variance does not grow with depth.
        for block in self.trf_blocks:
            for proj in (block.att.out_proj, block.ff.layers[2]):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def forward(self, idx, positions=None, key_mask=None, cache: KVCache | None = None,
                return_hidden: bool = False, targets=None):
        """Logits for every position of `idx` (batch, n_tokens); with `targets` (batch, n_tokens)
        instead the mean next-token cross-entropy, computed without the full logits (gpt_core.loss).

        positions: (batch, n_tokens) absolute positions; default: consecutive, after the cache.
        key_mask: (batch, n_keys) True for real tokens, False for padding, covering the cached
        keys and `idx` (with a static cache: the whole cache); only needed for left-padded batches.
        return_hidden: return the final-norm outputs instead of logits (classification heads).
        """
        batch, n_tokens = idx.shape
        past = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(past, past + n_tokens, device=idx.device).unsqueeze(0)
        x = self.drop_emb(self.tok_emb(idx) + self.pos_emb(positions))
        mask = None
        static = cache is not None and cache.static
        if key_mask is not None or (past and n_tokens > 1) or static:
            n_keys = cache.max_length if static else past + n_tokens
            mask = self._attention_mask(key_mask, past, n_tokens, n_keys, idx.device)
        for layer, block in enumerate(self.trf_blocks):
            x = block(x, mask, cache, layer)
        if cache is not None:
            cache.length += n_tokens
        x = self.final_norm(x)
        if targets is not None:
            if type(self.out_head) is nn.Linear and self.out_head.bias is None:
                return vocabulary_loss(x, self.out_head.weight, targets)
            return logits_loss(self.out_head(x), targets)  # a wrapped head (LoRA) computes its own logits
        return x if return_hidden else self.out_head(x)

    @staticmethod
    def _attention_mask(key_mask, past, n_tokens, n_keys, device):
        query_pos = torch.arange(past, past + n_tokens, device=device).unsqueeze(1)
        key_pos = torch.arange(n_keys, device=device).unsqueeze(0)
        causal = key_pos <= query_pos
        if key_mask is None:
            return causal
        # Every query may at least see itself: a padding query with no visible key would
        # make softmax produce NaN, which then leaks through 0 * NaN into real rows.
        mask = (causal & key_mask[:, None, :]) | (key_pos == query_pos)
        return mask.unsqueeze(1)
