"""Two autograd functions that keep the margin heads close to plain softmax in cost.

At face-recognition sizes (C ≈ 1e5 classes) the GEMMs are fast and every extra elementwise
pass over the (B, C) logits (100 MB at B = 256) or the (C, d) class centres (200 MB at d = 512)
shows up in the step time; on CPU a freshly allocated (B, C) tensor costs about two in-place
passes more (page faults). Written as plain autograd ops, normalise-W + clamp + scale + target
replacement cost ~2.5× a softmax step on CPU. `CosineLogits` does the whole cosine head, its
interclass filter and any margin that touches only the target logits, with two in-place passes
forward and three backward beyond softmax's; `ScaleWithTarget` serves the heads whose margin
changes the non-target logits too (NPCFace, HSM's pseudo-class). Both are once-differentiable.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

#: ``target_margin(c (B,), labels (B,)) -> ψ(c) (B,)``: the new target cosines, written with
#: differentiable torch ops (`CosineLogits` takes dψ/dc from autograd on these B values).
TargetMargin = Callable[[Tensor, Tensor], Tensor]


class CosineLogits(torch.autograd.Function):
    """Scaled cosine logits with an optional interclass filter and target-only margin.

        cos_ij   = clamp(<e_i, W_j> / (|e_i| |W_j|), −1 + eps, 1 − eps)
        logit_ij = s · cos_ij                      j ≠ y_i, not filtered
                   0                               j ≠ y_i, cos_ij > threshold (filtered)
                   s · ψ(cos_iy)                   j = y_i  (ψ = ``target_margin``, or identity)

    ``forward(ctx, emb (B, d), weight (C, d), labels (B,) or None, s, eps, threshold or None,
    target_margin or None) -> (B, C)``, in at least float32 (also under autocast); ``emb`` is
    raw (normalised here, as ``F.normalize``). ``labels`` may be None only without a threshold
    and a margin.

    Never materialises a normalised (C, d) copy of W: the (B, C) product of the scaled unit
    embeddings s·u_i with W is multiplied in place by 1 / |W_j| per column. Backward, with
    h_ij = ∂L/∂logit_ij / |W_j| (times ψ' at the targets, 0 where filtered), so that
    ∂L/∂cos_ij / |W_j| = s·h_ij:

        g          = h W                                              (B, d)  GEMM, as softmax
        ∂L/∂e_i    = (s / |e_i|) (g_i − u_i <u_i, g_i>)
        ∂L/∂W_j    = Σ_i h_ij s·u_i − (Σ_i h_ij s·cos_ij) W_j / |W_j|  (C, d)  GEMM + one pass

    Σ_i h_ij s·cos_ij is read off the saved logits (the output), with the B target entries
    taken from s·cos instead of s·ψ. Extra (B, C) passes over softmax: scale + clamp forward;
    h (the one allocation) + product + column sum backward. The clamp only guards acos /
    sqrt(1 − cos²) in the margins: its gradient is passed straight through (it moves a cosine by
    at most eps). Filtered entries are a constant 0 (arcface_torch builds the mask under
    no_grad): they get no gradient. The few C- and B-sized ops are kept few on purpose: on a
    busy CPU every parallel op waits for all its threads.
    """

    @staticmethod
    def forward(
        ctx,
        emb: Tensor,
        weight: Tensor,
        labels: Tensor | None,
        s: float,
        eps: float,
        threshold: float | None,
        target_margin: TargetMargin | None,
    ) -> Tensor:
        emb_norm = emb.norm(dim=1).clamp_min_(1e-12)  # as F.normalize
        weight_norm = weight.norm(dim=1).clamp_min_(1e-12)
        scaled_unit = emb * (s / emb_norm)[:, None]  # s·u: the scale costs a (B, d) pass only
        logits = scaled_unit @ weight.T
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        # column scale and clamp in logit units: two in-place passes, no (B, C) temporary
        logits.div_(weight_norm.to(logits.dtype)).clamp_(-s * (1.0 - eps), s * (1.0 - eps))
        filtered = target_logit = slope = None
        if threshold is not None:
            filtered = logits > s * threshold
            filtered.scatter_(1, labels[:, None], False)  # the target is never filtered
            logits.masked_fill_(filtered, 0.0)
        if target_margin is not None:
            target_logit = logits.gather(1, labels[:, None]).squeeze(1)
            with torch.enable_grad():
                c = (target_logit / s).requires_grad_(True)
                psi = target_margin(c, labels)
                (slope,) = torch.autograd.grad(psi, c, torch.ones_like(psi), allow_unused=True)
            if slope is None:  # ψ does not depend on c (e.g. a constant): no gradient flows
                slope = torch.zeros_like(target_logit)
            # the margin's own (B-sized) arithmetic may be in a lower autocast dtype
            logits.scatter_(1, labels[:, None], (s * psi.detach()).to(logits.dtype)[:, None])
        ctx.s = s
        ctx.save_for_backward(
            scaled_unit,
            emb_norm,
            weight,
            weight_norm,
            logits,
            labels,
            filtered,
            target_logit,
            slope,
        )
        return logits

    @staticmethod
    @once_differentiable
    def backward(
        ctx, grad: Tensor
    ) -> tuple[Tensor | None, Tensor | None, None, None, None, None, None]:
        (
            scaled_unit,
            emb_norm,
            weight,
            weight_norm,
            logits,
            labels,
            filtered,
            target_logit,
            slope,
        ) = ctx.saved_tensors
        s = ctx.s
        h = grad / weight_norm.to(grad.dtype)  # the one (B, C) allocation of the backward
        if filtered is not None:
            h.masked_fill_(filtered, 0.0)
        if slope is not None:
            rows = labels[:, None]
            h_target = h.gather(1, rows).squeeze(1) * slope.to(h.dtype)
            h.scatter_(1, rows, h_target[:, None])
        su = scaled_unit.to(h.dtype)
        grad_emb = grad_weight = None
        if ctx.needs_input_grad[0]:
            g = h @ weight.to(h.dtype)
            norm = emb_norm.to(h.dtype)
            # <u, g> / |e| · s as su = s·u; bmm: one batched dot, where mul + sum takes two ops
            radial = torch.bmm(su[:, None, :], g[:, :, None]).view(-1) / (s * norm)
            grad_emb = g.mul_((s / norm)[:, None]).addcmul_(su, radial[:, None], value=-1.0)
            grad_emb = grad_emb.to(scaled_unit.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = h.T @ su
            # Σ_i h_ij s·cos_ij: h is ours, so multiply it in place by the logits (filtered
            # entries have h = 0) and put back s·cos (not s·ψ) at the B targets.
            products = h.mul_(logits)
            if slope is not None:
                products.scatter_(1, rows, (h_target * target_logit.to(h.dtype))[:, None])
            # column sums as a GEMV: about 3× faster than sum(0) on CPU, no zero-filled output
            radial = products.new_ones(products.shape[0]) @ products
            radial.div_(weight_norm.to(h.dtype))
            grad_weight.addcmul_(weight.to(h.dtype), radial[:, None], value=-1.0)
            grad_weight = grad_weight.to(weight.dtype)
        return grad_emb, grad_weight, None, None, None, None, None


class ScaleWithTarget(torch.autograd.Function):
    """out = s · others, then out[i, labels[i]] = s · target[i]: (B, C'), (B,), (B,) -> (B, C').

    One pass forward and one backward, where ``s * cos.scatter(...)`` takes four.
    Backward: ∂/∂others = s · g with the target entries zeroed, ∂/∂target_i = s · g[i, y_i].
    """

    @staticmethod
    def forward(ctx, others: Tensor, labels: Tensor, target: Tensor, s: float) -> Tensor:
        out = others * s
        out.scatter_(1, labels[:, None], (target * s).to(out.dtype)[:, None])
        ctx.save_for_backward(labels)
        ctx.s = s
        ctx.target_dtype = target.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, Tensor, None]:
        (labels,) = ctx.saved_tensors
        grad_target = grad.gather(1, labels[:, None]).squeeze(1) * ctx.s
        grad_others = grad * ctx.s
        grad_others.scatter_(1, labels[:, None], 0.0)
        return grad_others, None, grad_target.to(ctx.target_dtype), None
