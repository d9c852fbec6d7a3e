"""Next-token cross-entropy over the vocabulary without materialising the full logits.

At GPT-2 size the output head dominates memory traffic: one 8 x 256 batch has 400 MB of fp32
logits, written, re-read by softmax and again by its backward. `vocabulary_loss` goes through
the rows in chunks instead; for each chunk it computes the logits, their loss and, when training,
already the gradients of the hidden states and of the head's weight, so no chunk's logits outlive
it. The value is the plain loss's: the same logits in the same precision, log-softmax in fp32,
mean over the counted targets.

Each elementwise pass over a chunk's logits costs more than its arithmetic, so a chunk takes as
few as there are: one fp32 log-softmax for the loss, one softmax in the compute dtype for the
gradient (computed in fp32 and rounded once, as the plain path rounds it), the targets' entries
written apart, and ignored rows masked on the narrow side of the matmuls (hidden states, not
logits).
"""

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
CHUNK_ROWS = 1024  # 1024 x 50257 fp32 is 200 MB at most alive at once
# The head is multiplied this many vocabulary rows at a time: oneDNN runs a 50257-wide bf16 head
# about 2x faster in blocks of 8192 than whole (AMX, the team's CPU), and no slower in fp32.
VOCAB_BLOCK = 8192


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype


def _logits(hidden, weight):
    """hidden @ weight.T, one block of the vocabulary at a time, in hidden's dtype."""
    if torch.compiler.is_compiling():
        return hidden @ weight.t()  # the compiler plans the matmul itself; `out=` slices break its graph
    logits = torch.empty((hidden.size(0), weight.size(0)), dtype=hidden.dtype, device=hidden.device)
    for start in range(0, weight.size(0), VOCAB_BLOCK):
        end = start + VOCAB_BLOCK
        torch.mm(hidden, weight[start:end].t(), out=logits[:, start:end])
    return logits


def _target_log_probs(logits, safe_target):
    """Each row's log-probability of its target, from a log-softmax in fp32 (F.cross_entropy's)."""
    return torch.log_softmax(logits, dim=-1, dtype=torch.float32).gather(1, safe_target.unsqueeze(1)).squeeze(1)


class _FusedLoss(torch.autograd.Function):
    """The loss's forward computes its gradients too (chunk by chunk); backward only scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, counted, dtype):
        compute_hidden, compute_weight = hidden.to(dtype), weight.to(dtype)
        grad_hidden = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device)
        # Accumulated in the compute dtype: each chunk's product is summed in fp32 inside the
        # matmul and rounded once, as the plain path rounds the head's gradient once.
        grad_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.size(0), CHUNK_ROWS):
            end = min(start + CHUNK_ROWS, hidden.size(0))
            rows = compute_hidden[start:end]
            target = targets[start:end]
            keep = target != IGNORE_INDEX
            safe_target = target.clamp(min=0)
            logits = _logits(rows, compute_weight)
            picked = _target_log_probs(logits, safe_target)
            total -= (picked * keep).sum()
            # d(sum of losses)/d logits = softmax - one-hot on counted rows. The target's entry,
            # p - 1, is taken in fp32 from the log-probability before rounding.
            grad = torch.softmax(logits, dim=-1)
            del logits
            at_target = torch.arange(end - start, device=grad.device) * grad.size(1) + safe_target
            grad.view(-1)[at_target] = (picked.exp() - 1).to(dtype)
            keep = keep.unsqueeze(1)
            grad_hidden[start:end] = (grad @ compute_weight) * keep
            kept_rows = rows * keep
            for block_start in range(0, weight.size(0), VOCAB_BLOCK):
                block = grad_weight[block_start:block_start + VOCAB_BLOCK]
                torch.addmm(block, grad[:, block_start:block_start + VOCAB_BLOCK].t(), kept_rows, out=block)
        ctx.save_for_backward(grad_hidden, grad_weight, counted)
        ctx.dtypes = hidden.dtype, weight.dtype
        return total / counted

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, counted = ctx.saved_tensors
        scale = grad_output / counted
        hidden_dtype, weight_dtype = ctx.dtypes
        # Scaled after widening: a bf16 gradient times scale would round once more.
        return (grad_hidden * scale).to(hidden_dtype), grad_weight.to(weight_dtype) * scale, None, None, None


def logits_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The plain loss from full logits (..., vocab): what vocabulary_loss equals."""
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), ignore_index=IGNORE_INDEX)


def vocabulary_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `targets`; -100 targets do not count.

    hidden: (..., emb_dim) final-norm outputs; weight: (vocab, emb_dim) the output head's;
    targets: (...) token ids. Under autocast the logits are computed in its dtype, as the head's
    own matmul would be, and so is the head's gradient.
    """
    dtype = _compute_dtype(hidden)
    hidden = hidden.reshape(-1, hidden.size(-1))
    targets = targets.reshape(-1)
    counted = (targets != IGNORE_INDEX).sum().clamp(min=1).float()
    with torch.autocast(hidden.device.type, enabled=False):
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            return _FusedLoss.apply(hidden, weight, targets, counted, dtype)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        total = sum((-_target_log_probs(_logits(hidden[start:start + CHUNK_ROWS], weight),
                                        targets[start:start + CHUNK_ROWS].clamp(min=0))
                     * (targets[start:start + CHUNK_ROWS] != IGNORE_INDEX)).sum()
                    for start in range(0, hidden.size(0), CHUNK_ROWS))
        return total / counted
