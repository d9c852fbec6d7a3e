"""FLOPs one training token costs GPTModel, counting only the work autograd really does.

PaLM's appendix B (and nanoGPT) count 6N + 12·L·H·Q·T per token: 2N forward, 4N backward, as if
every weight trained. Fine-tuning freezes most of them: a frozen weight needs no weight gradient,
and a layer with nothing trainable before it needs no input gradient either. Counting those
FLOPs anyway would overstate MFU on every fine-tuning stage, so here each matmul is counted as
autograd runs it, walking the model in forward order:

- forward: 2 FLOPs per weight;
- input gradient: 2 per weight, if anything before this layer trains;
- weight gradient: 2 per weight, if the weight trains.

LoRA's two low-rank factors are matmuls of their own, counted the same way. Attention's score
and value products (4·T·d forward per token and layer, twice that backward) are counted like a
weightless layer. Embedding lookups, norms and element-wise work are not matmuls and are left out.
"""

from torch import nn

from .lora import LoRAEmbedding, LoRALinear


class _Counter:
    def __init__(self):
        self.flops = 0.0
        self.upstream_trains = False  # does anything before the current layer train?

    def params(self, module: nn.Module):
        if any(p.requires_grad for p in module.parameters()):
            self.upstream_trains = True

    def matmul(self, weights: int, trains: bool):
        self.flops += 2 * weights * (1 + self.upstream_trains + trains)

    def linear(self, module: nn.Module):
        if isinstance(module, LoRALinear):
            low_rank = module.rank * (module.linear.in_features + module.linear.out_features)
            trains = module.lora_A.requires_grad
            self.matmul(module.linear.weight.numel(), module.linear.weight.requires_grad)
            self.matmul(low_rank, trains)
            self.params(module)
        else:
            self.matmul(module.weight.numel(), module.weight.requires_grad)
            self.params(module)

    def embedding(self, module: nn.Module):
        if isinstance(module, LoRAEmbedding):
            self.matmul(module.rank * module.embedding.embedding_dim, module.lora_B.requires_grad)
        self.params(module)

    def attention_core(self, seq_len: int, emb_dim: int):
        self.flops += 4 * seq_len * emb_dim * (1 + 2 * self.upstream_trains)


def training_flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Forward + backward FLOPs per token of one training step on sequences of `seq_len` tokens."""
    count = _Counter()
    count.embedding(model.tok_emb)
    count.embedding(model.pos_emb)
    for block in model.trf_blocks:
        count.params(block.norm1)
        count.linear(block.att.qkv)
        count.attention_core(seq_len, model.cfg.emb_dim)
        count.linear(block.att.out_proj)
        count.params(block.norm2)
        count.linear(block.ff.layers[0])
        count.linear(block.ff.layers[2])
    count.params(model.final_norm)
    count.linear(model.out_head)
    return count.flops
