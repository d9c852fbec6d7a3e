"""Linear weights pre-packed for oneDNN, for decoding on the CPU.

A plain `F.linear` on the CPU hands oneDNN a row-major weight that it reorders into its blocked
layout on every call; at one token per step that reordering costs more than the multiply itself.
Reordering once, when a model is loaded to generate, is 2.2x faster per call for gpt2-small's
block projections at batch 1 and 1.7x for its output head (bf16, the team's CPU), and the bf16
results are bitwise those of `F.linear` (fp32 ones differ in rounding only: another summation
order). This is what inductor's freezing does for a compiled graph, here for eager decoding.

The packed copy is a cache beside the weight, not a replacement: the model keeps its parameters
(state_dict, tying and parameter counts are unchanged) at the cost of a second copy of the linear
weights. A step that needs gradients, runs under autocast or in a compiled graph, or a model
moved off the CPU, falls back to `F.linear`; a changed weight is packed again on its next call without gradients.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


def packing_supported(device) -> bool:
    """Whether `device` is a CPU whose PyTorch build has oneDNN's packed linear."""
    return (torch.device(device).type == "cpu" and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class PackedLinear(nn.Module):
    """An nn.Linear's weight and bias, multiplied through a oneDNN-packed copy of the weight."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # the same Parameter: a tied head stays tied
        self.bias = linear.bias
        self._packed = None
        self._packed_from = None
        self._pack()

    def _source(self):
        w = self.weight
        return w.data_ptr(), w._version, w.dtype, w.device

    def _pack(self):
        # The batch-size hint only steers oneDNN's choice of layout; 1 is the decode step's.
        self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 1)
        self._packed_from = self._source()

    def forward(self, x):
        if (not self.weight.is_cpu or torch.compiler.is_compiling() or x.dtype != self.weight.dtype
                or (torch.is_grad_enabled() and self.weight.requires_grad) or torch.is_autocast_enabled("cpu")):
            return F.linear(x, self.weight, self.bias)
        if self._packed_from != self._source():
            self._pack()
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")

    def __getstate__(self):
        # The packed copy is opaque to copy and pickle; a copy packs its own on first use.
        return {**super().__getstate__(), "_packed": None, "_packed_from": None}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack_linear_weights(model: nn.Module) -> nn.Module:
    """Swap every nn.Linear of `model` for a PackedLinear, in place, where the weights' device
    supports it (else leave the model as it is); returns the model."""
    weight = next(model.parameters(), None)
    if weight is None or not packing_supported(weight.device):
        return model
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, PackedLinear(child))
    return model
