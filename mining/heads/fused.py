"""`CosineLogits`: one autograd op for the heads whose margin changes only the target cosine.

It is an accelerator, not a definition: it computes exactly the plain formula of
`mining.heads.base.CosineHead.logits` with the head's ``target`` ψ, and
tests/test_heads_fused.py checks the two equal in float64 (logits and gradients). Why it
exists: at face-recognition sizes (C ≈ 1e5) every extra elementwise pass over the (B, C) logits
(100 MB at B = 256) or a normalised copy of the (C, d) class centres (200 MB at d = 512) shows in
the step time on CPU, where a fresh (B, C) tensor costs about five in-place passes (page
faults). The measured gain is in docs/benchmarks.md ("Margin heads: formula-first redesign").
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


class CosineLogits(torch.autograd.Function):
    """Scaled cosine logits with an optional interclass filter and a target margin, as one op.

        cos_ij   = clamp(<e_i, W_j> / (|e_i| |W_j|), −1 + eps, 1 − eps), then 0 where filtered
                   (j ≠ y_i and cos_ij > threshold)
        logit_ij = s · cos_ij  (j ≠ y_i),    s · ψ(cos_iy)  (j = y_i)

    ``apply(emb (B, d), weight (C, d), labels (B,), s, eps, threshold or None, target) ->
    (B, C)`` in at least float32 (also under autocast); ``target``: ψ, (B,) -> (B,), written
    with differentiable torch ops (its slope dψ/dc is taken from autograd on the B values).

    Never materialises a normalised (C, d) copy of W: the product of the scaled unit embeddings
    s·u_i with W is divided in place by |W_j|. Backward, with h_ij = ∂L/∂(s·cos_ij) / |W_j|
    (times ψ' at the targets, 0 where filtered):

        g          = h W                                              (B, d)  GEMM, as softmax
        ∂L/∂e_i    = (s / |e_i|) (g_i − u_i <u_i, g_i>)
        G          = hᵀ (s·u)                                         (C, d)  GEMM, as softmax
        ∂L/∂W_j    = G_j − r_j W_j / |W_j|,   r_j = Σ_i h_ij s·cos_ij

    r_j is taken from the output s·cos when no cosine was clamped (an in-place product with h
    and a GEMV), else from <G_j, W_j> / |W_j|, the unclamped cosines: the clamp's gradient is
    passed straight through, as in the plain path. h is a fresh tensor, so backward may run
    more than once (``retain_graph=True``, gradcheck).
    """

    @staticmethod
    def forward(
        ctx,
        emb: Tensor,
        weight: Tensor,
        labels: Tensor,
        s: float,
        eps: float,
        threshold: float | None,
        target: Callable[[Tensor], Tensor],
    ) -> Tensor:
        emb_norm = emb.norm(dim=1).clamp_min_(1e-12)  # as F.normalize
        weight_norm = weight.norm(dim=1).clamp_min_(1e-12)
        scaled_unit = emb * (s / emb_norm)[:, None]  # s folded into the GEMM's small operand
        logits = scaled_unit @ weight.T
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        # column scale and clamp: in-place passes, no (B, C) temporary
        logits.div_(weight_norm.to(logits.dtype))
        bound = s * (1.0 - eps)
        low, high = torch.aminmax(logits)
        ctx.clamped = bool(low < -bound or high > bound)  # see the backward's r_j
        logits.clamp_(-bound, bound)
        keep = None
        if threshold is not None:
            # float 0/1, 1 = kept: one vectorised pass where a boolean mask takes several
            keep = torch.le(logits, s * threshold, out=torch.empty_like(logits))
            keep.scatter_(1, labels[:, None], 1.0)  # the target is never filtered
            logits.mul_(keep)
        rows = labels[:, None]
        target_cos = logits.gather(1, rows).squeeze(1)  # s·cos θ_y
        c = target_cos / s
        slope = None
        if torch.is_inference_mode_enabled():  # no backward can follow: no slope
            psi = target(c)
        else:
            with torch.enable_grad():
                c.requires_grad_(True)
                psi = target(c)
                (slope,) = torch.autograd.grad(psi, c, torch.ones_like(psi), allow_unused=True)
            if slope is None:  # ψ does not depend on c (e.g. a constant): no gradient
                slope = torch.zeros_like(target_cos)
        # the margin's own (B-sized) arithmetic may be in a lower autocast dtype
        logits.scatter_(1, rows, (s * psi.detach()).to(logits.dtype)[:, None])
        ctx.s, ctx.emb_dtype = s, emb.dtype
        ctx.save_for_backward(
            scaled_unit, emb_norm, weight, weight_norm, labels, logits, target_cos, slope, keep
        )
        return logits

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        su, emb_norm, weight, weight_norm, labels, out, target_cos, slope, keep = ctx.saved_tensors
        h = grad * weight_norm.reciprocal().to(grad.dtype)  # the only fresh (B, C) tensor
        if keep is not None:
            h.mul_(keep)
        rows = labels[:, None]
        h_target = h.gather(1, rows).squeeze(1)
        if slope is not None:
            h_target = h_target * slope.to(h.dtype)
            h.scatter_(1, rows, h_target[:, None])
        su = su.to(h.dtype)
        grad_emb = grad_weight = None
        if ctx.needs_input_grad[0]:
            g = h @ weight.to(h.dtype)
            norm = emb_norm.to(h.dtype)
            # <u, g>/|e| as su = s·u; bmm: one batched dot where mul + sum take two
            radial = torch.bmm(su[:, None, :], g[:, :, None]).view(-1) / (ctx.s * norm)
            grad_emb = g.mul_((ctx.s / norm)[:, None]).addcmul_(su, radial[:, None], value=-1.0)
            grad_emb = grad_emb.to(ctx.emb_dtype)
        if ctx.needs_input_grad[1]:
            w = weight.to(h.dtype)
            grad_weight = h.T @ su
            w_norm = weight_norm.to(h.dtype)
            if ctx.clamped:  # r_j from the unclamped cosines: <G_j, W_j> / |W_j| (rare)
                coef = (grad_weight * w).sum(1).div_(w_norm.square())
            else:
                # r_j = Σ_i h_ij s·cos_ij: h is ours, so multiply it in place by the output
                # (filtered entries are 0 in both) and put back s·cos (not s·ψ) at the targets
                products = h.mul_(out)
                products.scatter_(1, rows, (h_target * target_cos.to(h.dtype))[:, None])
                # column sums as a GEMV: about 3× faster than sum(0) on CPU, no zero fill
                coef = (products.new_ones(products.shape[0]) @ products).div_(w_norm)
            grad_weight.addcmul_(w, coef[:, None], value=-1.0)
            grad_weight = grad_weight.to(weight.dtype)
        return grad_emb, grad_weight, None, None, None, None, None
