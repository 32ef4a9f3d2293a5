"""Log-probabilities of given tokens under a causal LM's logits.

Every preference loss in :mod:`alignkit.losses.preference` starts from ``log πθ(y|x)``, the sum (or
length-average) over completion tokens of ``log softmax(logits_t)[y_t]``. Computing that as
``logits.log_softmax(-1).gather(...)`` builds a second ``[B, T, V]`` tensor (in float32, for bf16
models, that is twice the logits), so :func:`selective_log_softmax` uses the identity

    log softmax(z)_i = z_i - logsumexp_j z_j

and evaluates the logsumexp a few rows at a time: only one float32 chunk of rows exists at a time, in the
forward and in the backward pass.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

# About 128 MiB of float32 per chunk: the rows per chunk are this divided by the vocabulary size.
_CHUNK_ELEMENTS = 2**25


def default_chunk_rows(vocab: int) -> int:
    """Rows of ``vocab`` float32 logits that fill about 128 MiB (one chunk of the chunked functions)."""
    return max(1, _CHUNK_ELEMENTS // max(vocab, 1))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # float16/bfloat16 logsumexp loses most of its digits; float64 stays float64 (tests, gradcheck).
    return torch.float64 if dtype == torch.float64 else torch.float32


class _SelectiveLogSoftmax(torch.autograd.Function):
    """``logits[a, t, index[a, t]] - logsumexp(logits[a, t])`` over ``[A, T, V]`` logits, chunked over T.

    The backward pass is also chunked: d/dz_j = g * (1[j == i] - softmax(z)_j), with the softmax rebuilt
    per chunk from the saved row max and log-sum instead of being kept from the forward pass.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, index: torch.Tensor, chunk_rows: int) -> torch.Tensor:
        compute_dtype = _compute_dtype(logits.dtype)
        n_outer, n_rows, _ = logits.shape
        # logsumexp = row_max + log_sum, kept apart: z_i - row_max is exact where it matters, so large
        # logits (|z| ~ 1e4 in float32) do not lose log p(i) to the rounding of logsumexp.
        row_max = torch.empty(n_outer, n_rows, dtype=compute_dtype, device=logits.device)
        log_sum = torch.empty_like(row_max)
        for a in range(n_outer):
            for start in range(0, n_rows, chunk_rows):
                rows = slice(start, start + chunk_rows)
                chunk = logits[a, rows].to(compute_dtype)
                chunk_max = chunk.amax(dim=-1)
                chunk_max = torch.where(torch.isfinite(chunk_max), chunk_max, torch.zeros_like(chunk_max))
                row_max[a, rows] = chunk_max
                log_sum[a, rows] = torch.exp(chunk - chunk_max.unsqueeze(-1)).sum(-1).log()
        selected = logits.gather(-1, index.unsqueeze(-1)).squeeze(-1).to(compute_dtype)
        ctx.save_for_backward(logits, index, row_max, log_sum)
        ctx.chunk_rows = chunk_rows
        return (selected - row_max) - log_sum

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        logits, index, row_max, log_sum = ctx.saved_tensors
        chunk_rows = ctx.chunk_rows
        grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        n_outer, n_rows, _ = logits.shape
        for a in range(n_outer):
            for start in range(0, n_rows, chunk_rows):
                rows = slice(start, start + chunk_rows)
                shifted = logits[a, rows].to(row_max.dtype) - row_max[a, rows].unsqueeze(-1)
                probs = torch.exp(shifted.sub_(log_sum[a, rows].unsqueeze(-1)))
                g = grad_output[a, rows].to(row_max.dtype).unsqueeze(-1)
                chunk_grad = probs.mul_(-g)
                chunk_grad.scatter_add_(-1, index[a, rows].unsqueeze(-1), g)
                grad_logits[a, rows] = chunk_grad
        return grad_logits, None, None


def selective_log_softmax(
    logits: torch.Tensor, index: torch.Tensor, chunk_rows: int | None = None
) -> torch.Tensor:
    """Log-probability of ``index`` under ``softmax(logits)``, without a full log-softmax tensor.

    Equation (``z`` = one row of logits over a vocabulary of size V, ``i`` = its index)::

        log p(i) = log softmax(z)_i = z_i - log sum_j exp(z_j)

    Equal to ``logits.log_softmax(-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)``, but the logsumexp
    (and, in the backward pass, the softmax) is computed a chunk of rows at a time, so at most one
    ``[chunk_rows, V]`` float32 temporary exists. float16/bfloat16 logits are upcast per chunk and the
    result is float32 (summing thousands of bf16 log-probs would lose the precision the losses need);
    float32/float64 logits give a result of the same dtype. Gradients flow to ``logits`` (first order only).

    Args:
        logits: ``[..., V]`` unnormalised scores (non-contiguous slices such as ``logits[:, :-1]`` are fine).
        index: ``[...]`` integer token ids in ``[0, V)``, the shape of ``logits`` without its last dim.
        chunk_rows: positions per chunk along the second-to-last dim; default about 128 MiB of float32.

    Returns:
        ``[...]`` log-probabilities.
    """
    if logits.shape[:-1] != index.shape:
        raise ValueError(
            f"selective_log_softmax: index has shape {tuple(index.shape)} but logits {tuple(logits.shape)}; "
            "index must be logits.shape[:-1] (one token id per position)."
        )
    if not logits.is_floating_point():
        raise ValueError(f"selective_log_softmax: logits must be floating point, got {logits.dtype}.")
    vocab = logits.shape[-1]
    if chunk_rows is None:
        chunk_rows = max(1, _CHUNK_ELEMENTS // max(vocab, 1))
    if chunk_rows < 1:
        raise ValueError(f"selective_log_softmax: chunk_rows must be >= 1, got {chunk_rows}.")
    # [..., T, V] -> [A, T, V] merges only the leading dims, which stays a view for slices like logits[:, :-1].
    rows = logits.shape[-2] if logits.dim() >= 2 else 1
    logits3d = logits.reshape(-1, rows, vocab)
    index2d = index.reshape(-1, rows).long()
    out = _SelectiveLogSoftmax.apply(logits3d, index2d, chunk_rows)
    return out.reshape(index.shape)


def token_logps(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Per-token ``log p(targets[b, t] | logits[b, t])``, zero where masked. No shift is applied.

    Use this when the logits are already aligned with their targets: ``logits[b, t]`` is the prediction for
    ``targets[b, t]``, e.g. when a caller computes logits only for completion positions (the hidden states
    at positions ``t-1`` that predict completion token ``t``). For full-sequence logits use
    :func:`sequence_logps`, which does the causal shift.

    Args:
        logits: ``[B, T, V]`` aligned logits.
        targets: ``[B, T]`` token ids; masked positions may hold any value (e.g. ``ignore_index``).
        mask: ``[B, T]`` bool/0-1, true where the token counts. Default: ``targets != ignore_index``.
        ignore_index: label value meaning "no token here", used only when ``mask`` is None.
        chunk_rows: passed to :func:`selective_log_softmax`.

    Returns:
        ``[B, T]`` log-probabilities, 0 at masked positions (and no gradient through them).
    """
    if mask is None:
        mask = targets != ignore_index
    else:
        if mask.shape != targets.shape:
            raise ValueError(
                f"token_logps: mask has shape {tuple(mask.shape)} but targets {tuple(targets.shape)}; they must match."
            )
        mask = mask.bool()
    # Masked targets may be -100: replace them with a valid id, then zero their log-probs.
    safe_targets = targets.masked_fill(~mask, 0)
    logps = selective_log_softmax(logits, safe_targets, chunk_rows=chunk_rows)
    return logps.masked_fill(~mask, 0.0)


def sequence_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each sequence's labelled tokens, and how many tokens were summed.

    Causal shift, done here: position ``t`` of a causal LM predicts token ``t+1``, so
    ``logits[:, :-1]`` are scored against ``labels[:, 1:]``; ``labels`` is the unshifted ``input_ids`` copy
    with ``ignore_index`` on prompt and padding tokens (the Hugging Face ``labels`` convention)::

        sum_logps[b] = sum_{t : labels[b, t+1] != ignore_index} log softmax(logits[b, t])[labels[b, t+1]]
        n_tokens[b]  = #{t : labels[b, t+1] != ignore_index}

    Length-averaged log-probs (SimPO, ORPO, IPO, CPO-ipo) are ``sum_logps / n_tokens.clamp(min=1)``. The
    token-mean NLL over a batch (what ``torch.nn.CrossEntropyLoss`` gives, the SFT/CPO/ORPO NLL term) is
    ``-sum_logps.sum() / n_tokens.sum()``.

    Args:
        logits: ``[B, T, V]`` logits for the whole sequence.
        labels: ``[B, T]`` token ids with ``ignore_index`` where no loss is taken.
        ignore_index: label value to skip.
        chunk_rows: passed to :func:`selective_log_softmax`.

    Returns:
        ``(sum_logps [B], n_tokens [B] int64)``; masked positions contribute 0.
    """
    if logits.dim() != 3 or logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"sequence_logps: logits {tuple(logits.shape)} and labels {tuple(labels.shape)} must be [B, T, V] "
            "and [B, T] for the same B and T (pass the unshifted labels; the shift is done here)."
        )
    targets = labels[:, 1:]
    mask = targets != ignore_index
    per_token = token_logps(logits[:, :-1], targets, mask=mask, chunk_rows=chunk_rows)
    return per_token.sum(-1), mask.sum(-1)


# --------------------------------------------------------------------------------------------------
# Log-probs straight from hidden states: the LM head and the log-softmax gather, chunk by chunk
# --------------------------------------------------------------------------------------------------


class _LinearLogps(torch.autograd.Function):
    """``log softmax(scale * (h W^T + b))[target]`` (and the entropy) for ``N`` hidden states, chunked over N.

    Forward keeps hidden states, weight and the per-row log-sum-exp; no ``[N, V]`` tensor survives a chunk.
    Backward rebuilds each chunk's logits and applies, with ``p = softmax(z)`` and ``z = scale * logits``:

        d logp / dz = onehot(target) - p            d H / dz = -p * (log p + H)

    When the weight and bias need no gradient (a frozen LM head, e.g. LoRA), the hidden-state gradient
    directions ``(onehot - p) W`` and ``-(p (log p + H)) W`` are computed in the forward pass instead, and
    backward only scales them: no logits are rebuilt.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, scale, chunk_rows, matmul_dtype, want_entropy, entropy_grad,
                grad_hidden_in_forward):
        compute = _compute_dtype(hidden.dtype)
        n = hidden.shape[0]
        w = weight.to(matmul_dtype)
        b = None if bias is None else bias.to(compute)
        logps = torch.empty(n, dtype=compute, device=hidden.device)
        entropy = torch.zeros(n, dtype=compute, device=hidden.device)
        mean_logits = torch.empty(n, dtype=compute, device=hidden.device)
        row_max, log_sum = torch.empty_like(logps), torch.empty_like(logps)
        direction = torch.empty((n, hidden.shape[1]), dtype=hidden.dtype, device=hidden.device) \
            if grad_hidden_in_forward else None
        entropy_direction = torch.empty_like(direction) if grad_hidden_in_forward and entropy_grad else None
        for start in range(0, n, chunk_rows):
            rows = slice(start, start + chunk_rows)
            z = _chunk_logits(hidden[rows], w, b, compute)
            mean_logits[rows] = z.mean(-1)
            if scale != 1.0:
                z.mul_(scale)
            # log p = (z - max) - log sum exp(z - max), kept apart as in selective_log_softmax
            chunk_max = z.amax(dim=-1)
            row_max[rows] = chunk_max
            log_p = z.sub_(chunk_max.unsqueeze(-1))
            chunk_log_sum = torch.exp(log_p).sum(-1).log()
            log_sum[rows] = chunk_log_sum
            index = targets[rows].unsqueeze(-1)
            logps[rows] = log_p.gather(-1, index).squeeze(-1) - chunk_log_sum
            if want_entropy or direction is not None:
                log_p.sub_(chunk_log_sum.unsqueeze(-1))
                p = log_p.exp()
                if want_entropy:
                    entropy[rows] = -(p * log_p).sum(-1)
                if entropy_direction is not None:
                    ent_grad = log_p.add_(entropy[rows].unsqueeze(-1)).mul_(p).neg_()
                    entropy_direction[rows] = (ent_grad.to(matmul_dtype) @ w).to(hidden.dtype)
                if direction is not None:
                    grad = p.neg_().scatter_add_(-1, index, torch.ones_like(index, dtype=p.dtype))
                    direction[rows] = (grad.to(matmul_dtype) @ w).to(hidden.dtype)
        if direction is not None:
            ctx.save_for_backward(direction, entropy_direction)
        else:
            ctx.save_for_backward(hidden, weight, bias, targets, row_max, log_sum, entropy)
        ctx.scale, ctx.chunk_rows, ctx.matmul_dtype = scale, chunk_rows, matmul_dtype
        ctx.grad_hidden_in_forward, ctx.entropy_grad = grad_hidden_in_forward, entropy_grad
        ctx.mark_non_differentiable(mean_logits)
        if not entropy_grad:
            ctx.mark_non_differentiable(entropy)
        ctx.set_materialize_grads(False)
        return logps, entropy, mean_logits

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logps, grad_entropy, _grad_mean):
        scale = ctx.scale
        if not ctx.entropy_grad:
            grad_entropy = None
        if ctx.grad_hidden_in_forward:
            direction, entropy_direction = ctx.saved_tensors
            grad_hidden = torch.zeros_like(direction)
            if grad_logps is not None:
                grad_hidden += direction * (grad_logps * scale).to(direction.dtype).unsqueeze(-1)
            if grad_entropy is not None:
                grad_hidden += entropy_direction * (grad_entropy * scale).to(direction.dtype).unsqueeze(-1)
            return grad_hidden, None, None, None, None, None, None, None, None, None
        hidden, weight, bias, targets, row_max, log_sum, entropy = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        mm, compute = ctx.matmul_dtype, row_max.dtype
        w = weight.to(mm)
        b = None if bias is None else bias.to(compute)
        if grad_logps is None:
            grad_logps = torch.zeros_like(row_max)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=compute, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=compute, device=weight.device) if need_bias else None
        for start in range(0, hidden.shape[0], ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            h = hidden[rows].to(mm)
            z = _chunk_logits(h, w, b, compute)
            if scale != 1.0:
                z.mul_(scale)
            log_p = z.sub_(row_max[rows].unsqueeze(-1)).sub_(log_sum[rows].unsqueeze(-1))
            p = log_p.exp()
            g = grad_logps[rows].to(compute).unsqueeze(-1)
            if grad_entropy is not None:
                ge = grad_entropy[rows].to(compute).unsqueeze(-1)
                # dL/dz = g (onehot - p) - ge p (log p + H), built in the log_p buffer
                grad_z = log_p.add_(entropy[rows].unsqueeze(-1)).mul_(ge).add_(g).mul_(p).neg_()
            else:
                grad_z = p.mul_(-g)
            grad_z.scatter_add_(-1, targets[rows].unsqueeze(-1), g)
            if scale != 1.0:
                grad_z.mul_(scale)
            grad_mm = grad_z.to(mm)
            if need_hidden:
                grad_hidden[rows] = (grad_mm @ w).to(hidden.dtype)
            if need_weight:
                if mm == compute:
                    grad_weight.addmm_(grad_mm.t(), h)
                else:
                    grad_weight += (grad_mm.t() @ h).to(compute)
            if need_bias:
                grad_bias += grad_z.sum(0)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None, None


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  compute: torch.dtype) -> torch.Tensor:
    """A chunk's logits in the compute dtype (a fresh tensor, safe to modify in place)."""
    z = (hidden.to(weight.dtype) @ weight.t()).to(compute)
    if bias is not None:
        z += bias
    return z


def linear_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    scale: float = 1.0,
    entropy: bool = False,
    entropy_grad: bool = True,
    chunk_rows: int | None = None,
    matmul_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Log-probs of ``targets`` under an LM head ``logits = hidden @ weight.T + bias``, without ``[N, V]`` logits.

    Equal (values and gradients w.r.t. ``hidden``, ``weight`` and ``bias``) to::

        z = scale * F.linear(hidden, weight, bias)
        logps = z.log_softmax(-1).gather(-1, targets[:, None])[:, 0]
        entropy = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)

    but only one ``[chunk_rows, V]`` block of logits exists at a time, in the forward pass and in the backward
    pass (which recomputes each block's logits from the saved hidden states). ``scale`` is ``1 / temperature``.

    Args:
        hidden: ``[N, H]`` final hidden states, each the one that predicts ``targets[i]``.
        weight: ``[V, H]`` LM-head weight (a tied embedding matrix is fine); ``bias``: ``[V]`` or None.
        targets: ``[N]`` token ids.
        entropy: also return each row's entropy; ``entropy_grad``: with its gradient (else detached).
        chunk_rows: rows per chunk; default about 128 MiB of float32 logits.
        matmul_dtype: dtype of the matmuls (e.g. the autocast dtype); default the weight's dtype.

    Returns:
        ``(logps [N], entropy [N] or None, mean_logits [N])``, float32 (float64 for float64 inputs);
        ``mean_logits`` (the mean over the vocabulary of the unscaled logits) carries no gradient.
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1] or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"linear_logps: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} and targets "
                         f"{tuple(targets.shape)} must be [N, H], [V, H] and [N].")
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(weight.shape[0])
    matmul_dtype = matmul_dtype or weight.dtype
    head_grad = torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad))
    grad_hidden_in_forward = torch.is_grad_enabled() and hidden.requires_grad and not head_grad
    logps, ent, mean_logits = _LinearLogps.apply(hidden, weight, bias, targets.long(), float(scale), chunk_rows,
                                                 matmul_dtype, entropy, entropy and entropy_grad,
                                                 grad_hidden_in_forward)
    return logps, (ent if entropy else None), mean_logits
