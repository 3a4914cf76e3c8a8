"""Training losses, organised by model. Each returns the scalar total and its named terms.

CRM (reference `train.py`, `util/metrics_compute_crm.py`, README weights): with logits z,
probabilities p = sigmoid(z) and the soft ground truth g = 8-bit GT / 255 in [0, 1] (as
stored, not binarised: the reference's `ToTensor`), all [B, H, W, 1],

    loss = 1.0 * BCE(z, g > 0.5) + 0.5 * L1(p, g) + 0.5 * MSE(p, g)
           + 2.0 * L1(sobel(g), sobel(p)),

every term a mean over all pixels (`jax_refine.ops.sobel`). Only the BCE target is binary
(g > 0.5: 8-bit values >= 128); L1, MSE and the Sobel term see the soft g.

PNA (reference `pna/pna.py`, `pna/loss.py`, detectron2's semantic heads): every prediction
P0..P4 [B, h, w, K] is upsampled bilinearly (align_corners=False) to the label size [B, H, W]
and scored with per-pixel cross-entropy, label 255 ignored;

    loss = 1.0 * L(P0) + 0.1 * (L(P1) + L(P2) + L(P3) + L(P4)),

L being 'cross_entropy' (mean over the valid pixels), 'hard_pixel_mining' (the official
`DeepLabCE(top_k_percent_pixels=0.2)`, see `hard_pixel_cross_entropy`) or
'cross_entropy_all' (mmseg's `CrossEntropyLoss` as the reference's mmsegmentation branch
uses it, `avg_non_ignore=False`: the sum over the valid pixels divided by ALL pixels of the
batch, ignored ones included). The detectron2 configs pick L per head: P1..P4 follow
PNA_HEAD.LOSS_TYPE; P0 follows SEM_SEG_HEAD.LOSS_TYPE only for the DeepLabV3 coarse head
(`DeepLabV3_PNA_Head`) — detectron2's `SemSegFPNHead.losses` always uses plain
cross-entropy, whatever LOSS_TYPE says, so every Semantic FPN config has a 'cross_entropy' P0
(e.g. Cityscapes FPN: P0 and P1..P4 plain cross-entropy; DeepGlobe and Trans10k: P0 plain,
P1..P4 mining). The mmseg configs use 'cross_entropy_all' throughout.

mmseg's auxiliary head (training only, `PNASegmentor.auxiliary_head`) adds
`aux_weight * L_coarse(aux)` (its logits upsampled the same way; 0.4 in every PNA mmseg
config). Every mmseg head (`BaseDecodeHead.losses`, PNA's `PNAHead.losses`) resizes its
logits to the label size with bilinear, align_corners=False, as here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jax_refine.ops.resize import resize_bilinear
from jax_refine.ops.sobel import sobel

Array = Any

# ----------------------------------------------------------------------------- CRM

CRM_WEIGHTS = {"bce": 1.0, "l1": 0.5, "mse": 0.5, "sobel": 2.0}


def crm_loss_terms(logits: Array, gt: Array) -> dict[str, Array]:
    """Unweighted CRM loss terms (float32 scalars).

    Args:
      logits: [B, H, W, 1] decoder logits.
      gt: [B, H, W, 1] soft ground truth in [0, 1] (8-bit GT / 255).
    """
    if logits.shape != gt.shape or logits.ndim != 4:
        raise ValueError(f"expected logits and gt of equal [B, H, W, C] shape, got "
                         f"{logits.shape} and {gt.shape}")
    logits = logits.astype(jnp.float32)
    gt = gt.astype(jnp.float32)
    prob = jax.nn.sigmoid(logits)
    hard = (gt > 0.5).astype(jnp.float32)
    return {
        "bce": optax.sigmoid_binary_cross_entropy(logits, hard).mean(),
        "l1": jnp.abs(prob - gt).mean(),
        "mse": jnp.square(prob - gt).mean(),
        "sobel": jnp.abs(sobel(gt) - sobel(prob)).mean(),
    }


def crm_loss(
    logits: Array, gt: Array, weights: dict[str, float] | None = None
) -> tuple[Array, dict[str, Array]]:
    """(weighted total, unweighted terms) of the CRM loss; see the module docstring."""
    weights = CRM_WEIGHTS if weights is None else weights
    terms = crm_loss_terms(logits, gt)
    total = sum(weights[k] * terms[k] for k in CRM_WEIGHTS)
    return total, terms


# ----------------------------------------------------------------------------- PNA

IGNORE_LABEL = 255
HARD_PIXEL_RATIO = 0.2  # official DeepLabCE(top_k_percent_pixels=0.2)
PNA_LOSS_TYPES = ("cross_entropy", "hard_pixel_mining", "cross_entropy_all")


def pixel_cross_entropy(
    logits: Array, labels: Array, ignore_label: int = IGNORE_LABEL
) -> tuple[Array, Array]:
    """Per-pixel cross-entropy of [B, H, W, K] logits against int [B, H, W] labels.

    Returns (losses float32 [B, H, W], 0 at ignored pixels; valid bool [B, H, W]).
    Labels other than `ignore_label` must be in 0..K-1.
    """
    if logits.shape[:-1] != labels.shape or logits.ndim != 4:
        raise ValueError(f"expected logits [B, H, W, K] and labels [B, H, W], got "
                         f"{logits.shape} and {labels.shape}")
    valid = labels != ignore_label
    safe = jnp.where(valid, labels, 0).astype(jnp.int32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe)
    return jnp.where(valid, losses, 0.0), valid


def cross_entropy(logits: Array, labels: Array, ignore_label: int = IGNORE_LABEL) -> Array:
    """Mean cross-entropy over the valid pixels of the batch (PyTorch `CrossEntropyLoss(
    ignore_index=255)`). A batch without valid pixels gives 0 (PyTorch gives NaN)."""
    losses, valid = pixel_cross_entropy(logits, labels, ignore_label)
    return losses.sum() / jnp.maximum(valid.sum(), 1)


def hard_pixel_cross_entropy(
    logits: Array, labels: Array, ratio: float = HARD_PIXEL_RATIO,
    ignore_label: int = IGNORE_LABEL,
) -> Array:
    """Hard-pixel mining, exactly the official `DeepLabCE`: the mean of the k largest
    per-pixel losses of the whole batch, k = int(ratio * B * H * W).

    As in the reference, the top k is taken per batch (not per image) over ALL pixels, the
    ignored ones counting as loss 0 (so a batch with few valid pixels averages in zeros, and
    an all-ignore batch gives exactly 0). Deviation: the reference's mean of an empty top-k
    (k = 0, fewer than 1 / ratio pixels) is NaN; here k is at least 1. ratio = 1 is the
    plain mean over all pixels (ignored included), as the reference's shortcut.
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    losses, _ = pixel_cross_entropy(logits, labels, ignore_label)
    losses = losses.reshape(-1)
    if ratio == 1.0:
        return losses.mean()
    k = max(1, int(ratio * losses.size))
    return jax.lax.top_k(losses, k)[0].mean()


def semantic_loss(
    logits: Array, labels: Array, loss_type: str, *, ratio: float = HARD_PIXEL_RATIO,
    ignore_label: int = IGNORE_LABEL,
) -> Array:
    """`loss_type` (one of `PNA_LOSS_TYPES`) of logits at the labels' size."""
    if loss_type == "cross_entropy":
        return cross_entropy(logits, labels, ignore_label)
    if loss_type == "cross_entropy_all":
        return pixel_cross_entropy(logits, labels, ignore_label)[0].mean()
    if loss_type == "hard_pixel_mining":
        return hard_pixel_cross_entropy(logits, labels, ratio, ignore_label)
    raise ValueError(f"loss_type must be one of {PNA_LOSS_TYPES}, got {loss_type!r}")


def pna_loss(
    stage_logits: Sequence[Array],
    labels: Array,
    *,
    coarse_loss: str = "hard_pixel_mining",
    stage_loss: str = "hard_pixel_mining",
    coarse_weight: float = 1.0,
    stage_weight: float = 0.1,
    ratio: float = HARD_PIXEL_RATIO,
    ignore_label: int = IGNORE_LABEL,
    aux_logits: Array | None = None,
    aux_weight: float = 0.0,
) -> tuple[Array, dict[str, Array]]:
    """(weighted total, unweighted terms {'p0'..'p4'[, 'aux']}) of the PNA loss (module
    docstring).

    Args:
      stage_logits: [P0, P1, ...], each [B, h, w, K] at its own stride.
      labels: int [B, H, W], `ignore_label` = void.
      coarse_loss, stage_loss: loss type of P0 and of P1..; coarse_weight, stage_weight:
        their weights (official 1.0 and 0.1).
      aux_logits: the auxiliary head's [B, h, w, K] logits (training only), scored with
        `coarse_loss`; ignored when `aux_weight` is 0.
      aux_weight: weight of the auxiliary term (mmseg: 0.4; 0 = none).
    """
    size = labels.shape[1:3]

    def term(logits: Array, loss_type: str) -> Array:
        if logits.shape[1:3] != size:
            logits = resize_bilinear(logits.astype(jnp.float32), size, align_corners=False)
        return semantic_loss(logits, labels, loss_type, ratio=ratio, ignore_label=ignore_label)

    terms = {f"p{i}": term(logits, coarse_loss if i == 0 else stage_loss)
             for i, logits in enumerate(stage_logits)}
    total = sum((coarse_weight if i == 0 else stage_weight) * terms[f"p{i}"]
                for i in range(len(stage_logits)))
    if aux_weight:
        if aux_logits is None:
            raise ValueError("pna_loss: aux_weight is set but no aux_logits were given (the "
                             "model needs auxiliary_head=True)")
        terms["aux"] = term(aux_logits, coarse_loss)
        total = total + aux_weight * terms["aux"]
    return total, terms
