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
    """What a margin that changes non-target logits returns from ``others_margin(logits, labels)``.

    The hook receives ``logits`` = s·cos (B, C) (clamped, filtered) and owns it: it may build
    its output in place there and return it (the backward then takes Σ_i h_ij s·cos_ij from
    the (C, d) gradient), or return a new tensor and leave ``logits`` unchanged (the backward
    reuses them). ``others`` (B, C'), C' ≥ C: the output logits (its target column is
    overwritten with s·ψ(cos θ_y)); its first C columns must be s·(a_ij·cos_ij + b_ij) with
    a_ij = ``slope`` where ``mask`` is 1 and 1 elsewhere (b, ``mask`` and extra columns are
    constants). ``mask``: float 0/1 (B, C), or None when ``slope`` is 1; it is handed over
    too: the backward computes the gradient in its storage.
    """

    others: Tensor
    target: TargetMargin
    mask: Tensor | None = None
    slope: float = 1.0


#: ``others_margin(logits (B, C) = s·cos, clamped and filtered, labels (B,)) -> OthersMargin``.
OthersMarginFn = Callable[[Tensor, Tensor], OthersMargin]

#: CPU row blocks of `row_blocks` hold about this many elements (1 MiB of float32): the
#: block's temporaries stay in cache and malloc reuses them, where one (B, C) temporary
#: costs page faults worth ~6 memory passes.
BLOCK_ELEMS = 1 << 18


def row_blocks(x: Tensor) -> list[slice]:
    """Slices of rows of a 2-D tensor x (N, K): blocks of ~``BLOCK_ELEMS`` on CPU, else one.

    Several ops on one block run while it is in cache (one memory sweep for all of them), and
    the block-sized temporaries are reused by malloc. CUDA caches its allocations: one block.
    """
    if x.device.type != "cpu" or x.shape[0] == 0:
        return [slice(0, x.shape[0])]
    rows = max(1, BLOCK_ELEMS // max(1, x.shape[1]))
    return [slice(i, i + rows) for i in range(0, x.shape[0], rows)]


def row_reduce(fn: Callable[..., Tensor], *tensors: Tensor) -> Tensor:
    """``fn(*tensors) -> (N,)`` for 2-D tensors (N, K), computed over `row_blocks`.

    For reductions whose torch form makes a full-size temporary (``(a * b).sum(1)``,
    ``logsumexp``; ``torch.linalg.vecdot`` too, at 10× a memory pass).
    """
    return torch.cat([fn(*(t[rows] for t in tensors)) for rows in row_blocks(tensors[0])])


def _scaled_gradient(
    grad: Tensor,
    weight_norm: Tensor,
    keep: Tensor | None,
    mask: Tensor | None,
    slope: float,
    in_masks: bool,
) -> Tensor:
    """h_ij = grad_ij · a_ij · keep_ij / |W_j| (B, C), a_ij = ``slope`` where mask_ij = 1, else 1.

    With ``in_masks``, written into a handed-over mask (``mask``, then ``keep``) where one
    fits: the only fresh (B, C) tensor of the backward otherwise.
    """

    def fits(t: Tensor | None) -> bool:
        return in_masks and t is not None and t.dtype == grad.dtype and t.shape == grad.shape

    h = None
    if mask is not None and slope != 1.0:
        h = torch.addcmul(grad, grad, mask, value=slope - 1.0, out=mask if fits(mask) else None)
    if keep is not None:
        if h is None:
            h = torch.mul(grad, keep, out=keep if fits(keep) else None)
        else:
            h.mul_(keep)
    inverse_norm = weight_norm.reciprocal().to(grad.dtype)
    return grad * inverse_norm if h is None else h.mul_(inverse_norm)


class CosineLogits(torch.autograd.Function):
    """Scaled cosine logits with an optional interclass filter and margin, as one op.

        cos_ij   = clamp(<e_i, W_j> / (|e_i| |W_j|), −1 + eps, 1 − eps), then 0 where filtered
                   (j ≠ y_i and cos_ij > threshold)
        logit_ij = s · cos_ij                  j ≠ y_i     (or ``others``, see `OthersMargin`)
                   s · ψ(cos_iy)               j = y_i     (ψ = the margin's target, or identity)

    ``forward(ctx, emb (B, d), weight (C, d), labels (B,) or None, s, eps, threshold or None,
    target_margin or None, others_margin or None, reuse_masks=True) -> (B, C')``, in at least
    float32 (also under autocast). ``emb`` is raw (normalised here, as ``F.normalize``);
    ``labels`` may be None only without filter and margin; at most one of the two margin hooks.

    Never materialises a normalised (C, d) copy of W: the (B, C) product of the scaled unit
    embeddings s·u_i with W is divided in place by |W_j| per column, giving s·cos, which
    becomes the output (targets overwritten in place) or is handed to the others-margin hook.
    Backward, with h_ij = ∂L/∂(s·cos_ij) / |W_j|:

        g          = h W                                              (B, d)  GEMM, as softmax
        ∂L/∂e_i    = (s / |e_i|) (g_i − u_i <u_i, g_i>)
        G          = hᵀ (s·u)                                         (C, d)  GEMM, as softmax
        ∂L/∂W_j    = G_j − r_j W_j / |W_j|,   r_j = Σ_i h_ij s·cos_ij = <G_j, W_j> / |W_j|

    h is the incoming gradient divided by |W_j|, times ψ' at the targets and the margin's slope
    on its mask, 0 where filtered; it is computed in a handed-over mask's storage when there is
    one. r comes from the output s·cos when it was kept (one in-place product with h and a
    GEMV, cheaper than the (C, d) form), else from <G_j, W_j> (an others-margin hook owns
    s·cos). With a target-only margin the extra (B, C) passes over softmax are divide + clamp
    forward and h + product + column sum backward. The clamp only guards acos / sqrt(1 − cos²)
    in the margins: its gradient is passed straight through (it moves a cosine by at most
    eps). Filtered entries are a constant 0 (arcface_torch builds the mask under no_grad): they
    get no gradient. C- and B-sized ops are kept few on purpose: on a busy CPU each parallel op
    waits for all its threads. With ``reuse_masks`` the backward computes h in the masks (the
    filter's and the margin's), saving a fresh (B, C) tensor (~20 ms at B = 256, C = 1e5 on
    CPU), so a second backward through the same forward (``retain_graph=True``, gradcheck) is
    refused with a clear error; with ``reuse_masks=False`` h is a fresh tensor.
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
        reuse_masks: bool = True,
    ) -> Tensor:
        emb_norm = emb.norm(dim=1).clamp_min_(1e-12)  # as F.normalize
        weight_norm = weight.norm(dim=1).clamp_min_(1e-12)
        scaled_unit = emb * (s / emb_norm)[:, None]  # s folded into the GEMM's small operand
        logits = scaled_unit @ weight.T
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        # column scale and clamp: two in-place passes, no (B, C) temporary
        logits.div_(weight_norm.to(logits.dtype)).clamp_(-s * (1.0 - eps), s * (1.0 - eps))
        keep = None
        if threshold is not None:
            # float 0/1, 1 = kept: float masks take one vectorised pass where boolean ones
            # take several on CPU, and the backward reuses its storage
            keep = torch.le(logits, s * threshold, out=torch.empty_like(logits))
            keep.scatter_(1, labels[:, None], 1.0)  # the target is never filtered
            logits.mul_(keep)
        target_cos = None
        if target_margin is not None or others_margin is not None:
            target_cos = logits.gather(1, labels[:, None]).squeeze(1)  # s·cos θ_y
        out, mask, mask_slope = logits, None, 1.0
        if others_margin is not None:
            out, target_margin, mask, mask_slope = others_margin(logits, labels)
        slope = None
        if target_margin is not None:
            c = target_cos / s
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
        ctx.s, ctx.mask_slope, ctx.emb_dtype = s, mask_slope, emb.dtype
        ctx.masks, ctx.reuse_masks = (keep, mask), reuse_masks  # see `_scaled_gradient`
        # s·cos (targets aside) for the backward, unless a hook built its output in it
        kept_cos = logits if others_margin is None or out is not logits else None
        ctx.save_for_backward(
            scaled_unit, emb_norm, weight, weight_norm, labels, kept_cos, target_cos, slope
        )
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        su, emb_norm, weight, weight_norm, labels, cos, target_cos, slope = ctx.saved_tensors
        if ctx.masks is None:
            raise RuntimeError(
                "CosineLogits: a second backward through the same forward (retain_graph=True)"
                " after the first one computed its gradient in the margin's masks; set"
                " head.reuse_masks = False to backward more than once"
            )
        keep, mask = ctx.masks
        if ctx.reuse_masks and (keep is not None or mask is not None):
            ctx.masks = None  # h is about to overwrite them
        grad = grad[:, : weight.shape[0]]  # extra columns (e.g. a virtual class) are constants
        h = _scaled_gradient(grad, weight_norm, keep, mask, ctx.mask_slope, ctx.reuse_masks)
        if slope is not None:
            rows = labels[:, None]
            h_target = h.gather(1, rows).squeeze(1) * slope.to(h.dtype)
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
            if cos is None:  # r_j / |W_j| = <G_j, W_j> / |W_j|²: both passes per row block
                for block in row_blocks(grad_weight):
                    g_block, w_block = grad_weight[block], w[block]
                    coef = (g_block * w_block).sum(1).div_(w_norm[block].square())
                    g_block.addcmul_(w_block, coef[:, None], value=-1.0)
            else:
                # r_j = Σ_i h_ij s·cos_ij: h is ours, so multiply it in place by the output
                # and put back s·cos (not s·ψ) at the B targets
                products = h.mul_(cos)
                if slope is not None:
                    products.scatter_(1, rows, (h_target * target_cos.to(h.dtype))[:, None])
                # column sums as a GEMV: about 3× faster than sum(0) on CPU, no zero fill
                coef = (products.new_ones(products.shape[0]) @ products).div_(w_norm)
                grad_weight.addcmul_(w, coef[:, None], value=-1.0)
            grad_weight = grad_weight.to(weight.dtype)
        return grad_emb, grad_weight, None, None, None, None, None, None, None
