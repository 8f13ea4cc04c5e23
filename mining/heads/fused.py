"""The autograd function that keeps the margin heads close to plain softmax in cost.

At face-recognition sizes (C ≈ 1e5 classes) the GEMMs are fast and every extra elementwise
pass over the (B, C) logits (100 MB at B = 256) or the (C, d) class centres (200 MB at d = 512)
shows up in the step time; on CPU a freshly allocated (B, C) tensor costs about five in-place
passes (page faults). Written as plain autograd ops, normalise + clamp + scale + margin cost
1.5–2.5× a softmax step on CPU. `CosineLogits` runs a whole margin head as one op: the margin
is given as hooks (`TargetMargin` on the B target cosines, or `OthersMargin` for heads that
change other logits too), so that it can work in place and patch the gradient in place.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

#: ``target_margin(c (B,), labels (B,)) -> ψ(c) (B,)``: the new target cosines, written with
#: differentiable torch ops (`CosineLogits` takes dψ/dc from autograd on these B values).
TargetMargin = Callable[[Tensor, Tensor], Tensor]


class OthersMargin(NamedTuple):
    """What a margin that changes non-target logits returns from ``others_margin(cos, labels)``.

    ``others`` (B, C'), C' ≥ C: a new tensor of scaled logits (its target column is
    overwritten with s·ψ(cos θ_y)); its first C columns must be s·(a_ij·cos_ij + b_ij) with
    a_ij = ``slope`` where ``mask`` is 1 and 1 elsewhere (b, ``mask`` and extra columns are
    constants). ``mask``: float 0/1 broadcastable to (B, C), or None when ``slope`` is 1.
    """

    others: Tensor
    target: TargetMargin
    mask: Tensor | None = None
    slope: float = 1.0


#: ``others_margin(cos (B, C) clamped and filtered, labels (B,)) -> OthersMargin``.
OthersMarginFn = Callable[[Tensor, Tensor], OthersMargin]


class CosineLogits(torch.autograd.Function):
    """Scaled cosine logits with an optional interclass filter and margin, as one op.

        cos_ij   = clamp(<e_i, W_j> / (|e_i| |W_j|), −1 + eps, 1 − eps), then 0 where filtered
                   (j ≠ y_i and cos_ij > threshold)
        logit_ij = s · cos_ij                  j ≠ y_i     (or ``others``, see `OthersMargin`)
                   s · ψ(cos_iy)               j = y_i     (ψ = the margin's target, or identity)

    ``forward(ctx, emb (B, d), weight (C, d), labels (B,) or None, s, eps, threshold or None,
    target_margin or None, others_margin or None) -> (B, C')``, in at least float32 (also under
    autocast). ``emb`` is raw (normalised here, as ``F.normalize``); ``labels`` may be None only
    without filter and margin; at most one of the two margin hooks.

    Never materialises a normalised (C, d) copy of W: the (B, C) product of the scaled unit
    embeddings k·u_i with W is divided in place by |W_j| per column, giving the saved matrix
    k·cos (k = s for a target-only margin, whose output it becomes; k = 1 for an others-margin,
    which builds a new output from it). Backward, with h_ij = ∂L/∂(k·cos_ij) / |W_j|:

        g          = h W                                              (B, d)  GEMM, as softmax
        ∂L/∂e_i    = (k / |e_i|) (g_i − u_i <u_i, g_i>)
        ∂L/∂W_j    = Σ_i h_ij k·u_i − (Σ_i h_ij k·cos_ij) W_j / |W_j|  (C, d)  GEMM + one pass

    h is the incoming gradient times s/k, divided by |W_j| (the one (B, C) allocation of the
    backward), times ψ' at the targets and the margin's slope on its mask, 0 where filtered;
    the column sums Σ_i h_ij k·cos_ij reuse h's storage (k·cos, not s·ψ, at the targets). With a
    target-only margin the extra (B, C) passes over softmax are scale + clamp forward and
    h + product + column sum backward. The clamp only guards acos / sqrt(1 − cos²) in the
    margins: its gradient is passed straight through (it moves a cosine by at most eps).
    Filtered entries are a constant 0 (arcface_torch builds the mask under no_grad): they get no
    gradient. C- and B-sized ops are kept few on purpose: on a busy CPU each parallel op waits
    for all its threads.
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
        others_margin: OthersMarginFn | None,
    ) -> Tensor:
        # with an others-margin, the hook sees (and the backward saves) unscaled cosines and
        # the hook applies s itself; otherwise s is folded into the GEMM's small operand.
        inner = 1.0 if others_margin is not None else s
        emb_norm = emb.norm(dim=1).clamp_min_(1e-12)  # as F.normalize
        weight_norm = weight.norm(dim=1).clamp_min_(1e-12)
        scaled_unit = emb * (inner / emb_norm)[:, None]  # a (B, d) pass, not a (B, C) one
        cos = scaled_unit @ weight.T
        cos = cos.to(torch.promote_types(cos.dtype, torch.float32))
        # column scale and clamp: two in-place passes, no (B, C) temporary
        cos.div_(weight_norm.to(cos.dtype)).clamp_(-inner * (1.0 - eps), inner * (1.0 - eps))
        filtered = None
        if threshold is not None:
            filtered = torch.gt(cos, inner * threshold, out=torch.empty_like(cos))  # float 0/1
            filtered.scatter_(1, labels[:, None], 0.0)  # the target is never filtered
            cos.addcmul_(cos, filtered, value=-1.0)  # cos·(1 − f), in place
        out, mask, mask_slope = cos, None, 1.0
        if others_margin is not None:
            margin = others_margin(cos, labels)
            out, target_margin, mask, mask_slope = margin
        target_cos = slope = None
        if target_margin is not None:
            target_cos = cos.gather(1, labels[:, None]).squeeze(1)
            c = target_cos / inner
            if torch.is_inference_mode_enabled():  # no backward can follow: no slope
                psi = target_margin(c, labels)
            else:
                with torch.enable_grad():
                    c.requires_grad_(True)
                    psi = target_margin(c, labels)
                    (slope,) = torch.autograd.grad(psi, c, torch.ones_like(psi), allow_unused=True)
                if slope is None:  # ψ does not depend on c (e.g. a constant): no gradient
                    slope = torch.zeros_like(target_cos)
            # the margin's own (B-sized) arithmetic may be in a lower autocast dtype
            out.scatter_(1, labels[:, None], (s * psi.detach()).to(out.dtype)[:, None])
        ctx.s, ctx.outer, ctx.mask_slope = s, s / inner, mask_slope
        ctx.cos_is_out, ctx.emb_dtype = out is cos, emb.dtype
        ctx.save_for_backward(
            scaled_unit, emb_norm, weight, weight_norm, cos, labels, filtered, mask, target_cos,
            slope,
        )  # fmt: skip
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        (su, emb_norm, weight, weight_norm, cos, labels, filtered, mask, target_cos, slope) = (
            ctx.saved_tensors
        )
        inner = ctx.s / ctx.outer
        grad = grad[:, : cos.shape[1]]  # extra columns (e.g. a virtual class) are constants
        h = grad / (weight_norm / ctx.outer).to(grad.dtype)  # the one (B, C) allocation
        if filtered is not None:
            h.addcmul_(h, filtered, value=-1.0)  # h·(1 − f)
        if mask is not None and ctx.mask_slope != 1.0:
            h.addcmul_(h, mask.to(h.dtype), value=ctx.mask_slope - 1.0)
        if slope is not None:
            rows = labels[:, None]
            h_target = h.gather(1, rows).squeeze(1) * slope.to(h.dtype)
            h.scatter_(1, rows, h_target[:, None])
        su = su.to(h.dtype)
        grad_emb = grad_weight = None
        if ctx.needs_input_grad[0]:
            g = h @ weight.to(h.dtype)
            norm = emb_norm.to(h.dtype)
            # <u, g>/|e| as su = k·u; bmm: one batched dot where mul + sum take two
            radial = torch.bmm(su[:, None, :], g[:, :, None]).view(-1) / (inner * norm)
            grad_emb = g.mul_((inner / norm)[:, None]).addcmul_(su, radial[:, None], value=-1.0)
            grad_emb = grad_emb.to(ctx.emb_dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = h.T @ su
            # Σ_i h_ij k·cos_ij: h is ours, so multiply it in place by the saved cosines
            # (filtered entries have h = 0) and, where the targets were overwritten in place,
            # put back k·cos (not s·ψ) at the B targets.
            products = h.mul_(cos)
            if slope is not None and ctx.cos_is_out:
                products.scatter_(1, rows, (h_target * target_cos.to(h.dtype))[:, None])
            # column sums as a GEMV: about 3× faster than sum(0) on CPU, no zero-filled output
            radial = products.new_ones(products.shape[0]) @ products
            radial.div_(weight_norm.to(h.dtype))
            grad_weight.addcmul_(weight.to(h.dtype), radial[:, None], value=-1.0)
            grad_weight = grad_weight.to(weight.dtype)
        return grad_emb, grad_weight, None, None, None, None, None, None
