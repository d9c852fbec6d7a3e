"""Next-token cross-entropy over the vocabulary without materialising the full logits.

At GPT-2 size the output head dominates memory traffic: one 8 x 256 batch has 400 MB of fp32
logits, written, re-read by softmax and again by its backward. `vocabulary_loss` goes through
the rows in chunks instead; for each chunk it computes the logits, their loss and, when training,
already the gradients of the hidden states and of the head's weight, so no chunk's logits outlive
it. The value is the plain loss's: the same logits in the same precision, log-softmax in fp32,
mean over the counted targets.
"""

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
CHUNK_ROWS = 1024  # 1024 x 50257 fp32 is 200 MB at most alive at once


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype


def _chunk_logits(hidden, weight, start, end):
    return (hidden[start:end] @ weight.t()).float()


class _FusedLoss(torch.autograd.Function):
    """The loss's forward computes its gradients too (chunk by chunk); backward only scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, counted, dtype):
        compute_hidden, compute_weight = hidden.to(dtype), weight.to(dtype)
        grad_hidden = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.size(0), CHUNK_ROWS):
            end = min(start + CHUNK_ROWS, hidden.size(0))
            logits = _chunk_logits(compute_hidden, compute_weight, start, end)
            target = targets[start:end]
            keep = target != IGNORE_INDEX
            safe_target = target.clamp(min=0).unsqueeze(1)
            # One log-softmax gives both the loss (what F.cross_entropy computes, op for op) and,
            # exponentiated in place, the softmax of the gradient.
            log_probs = torch.log_softmax(logits, dim=-1)
            total -= (log_probs.gather(1, safe_target).squeeze(1) * keep).sum()
            # d(sum of losses)/d logits = softmax - one-hot, on counted rows only. Dense ops, no
            # boolean indexing: shapes stay static for torch.compile.
            grad = log_probs.exp_()
            grad.scatter_add_(1, safe_target, keep.unsqueeze(1).to(grad.dtype).neg())
            grad = grad.to(dtype).mul_(keep.unsqueeze(1))
            grad_hidden[start:end] = grad @ compute_weight
            grad_weight += (grad.t() @ compute_hidden[start:end]).float()
        ctx.save_for_backward(grad_hidden, grad_weight, counted)
        ctx.dtypes = hidden.dtype, weight.dtype
        return total / counted

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, counted = ctx.saved_tensors
        scale = grad_output / counted
        hidden_dtype, weight_dtype = ctx.dtypes
        return (grad_hidden * scale).to(hidden_dtype), (grad_weight * scale).to(weight_dtype), None, None, None


def logits_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The plain loss from full logits (..., vocab): what vocabulary_loss equals."""
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), ignore_index=IGNORE_INDEX)


def vocabulary_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `targets`; -100 targets do not count.

    hidden: (..., emb_dim) final-norm outputs; weight: (vocab, emb_dim) the output head's;
    targets: (...) token ids. Under autocast the logits are computed in its dtype, as the head's
    own matmul would be; the head's gradient is accumulated in fp32.
    """
    dtype = _compute_dtype(hidden)
    hidden = hidden.reshape(-1, hidden.size(-1))
    targets = targets.reshape(-1)
    counted = (targets != IGNORE_INDEX).sum().clamp(min=1).float()
    with torch.autocast(hidden.device.type, enabled=False):
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            return _FusedLoss.apply(hidden, weight, targets, counted, dtype)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        total = sum(F.cross_entropy(_chunk_logits(hidden, weight, start, start + CHUNK_ROWS),
                                    targets[start:start + CHUNK_ROWS], ignore_index=IGNORE_INDEX, reduction="sum")
                    for start in range(0, hidden.size(0), CHUNK_ROWS))
        return total / counted
