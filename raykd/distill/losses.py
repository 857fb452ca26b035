"""Pure loss functions behind every distillation method.

Each function takes tensors and returns a scalar (or indices), has no state and no knowledge of
models, and states its paper and formula. Methods in :mod:`raykd.distill.methods` weight and sum
them. One convention across the package (see ``shared/DESIGN.md``):

    loss = (1 - alpha) * WCE(student, y) + alpha * T^2 * KL(p_teacher^T || p_student^T)

KL divergences are averaged over the batch (``batchmean``); the weighted cross-entropy is
normalised by the sum of the sample weights. Logit-based losses are computed in float32 so they
stay finite under mixed precision.

Example:
    >>> ce = weighted_cross_entropy(s_logits, y, weight=class_weights)
    >>> kd = kd_kl_div(s_logits, t_logits, temperature=4.0)
    >>> loss = 0.5 * ce + 0.5 * kd
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "channel_gram",
    "crkd_loss",
    "dkd_loss",
    "fcvit_probs_kl_chain",
    "fitnet_hint_loss",
    "hidden_cosine_loss",
    "hinton_kd_loss",
    "kd_kl_div",
    "kl_div_batchmean",
    "logit_mse",
    "pairwise_distances",
    "rkd_angle_loss",
    "rkd_distance_loss",
    "rotation_views",
    "selective_keep",
    "sskd_contrastive_loss",
    "sskd_similarity",
    "weighted_cross_entropy",
]


def weighted_cross_entropy(
    logits: Tensor, targets: Tensor, weight: Tensor | None = None, label_smoothing: float = 0.0
) -> Tensor:
    """Class-weighted cross-entropy with optional label smoothing.

    SSD-KD (Wang et al. 2023, Eq. 3) weights each class by its inverse frequency; Szegedy et al.
    (2016) smooth the one-hot target. With ``q_i = (1 - eps) * onehot(y_i) + eps / C`` and sample
    weight ``w_i = weight[y_i]`` (1 when no weights are given)::

        WCE = sum_i w_i * ( -sum_c q_ic * log softmax(z_i)_c ) / sum_i w_i

    Normalising by ``sum_i w_i`` (as ``torch.nn.CrossEntropyLoss(weight=...)`` does) keeps the
    loss on the same scale as unweighted CE. Unlike PyTorch, the smoothing part is weighted by
    the sample's class weight too, so one weight multiplies each sample's whole loss.

    Args:
        logits: ``(B, C)`` raw scores.
        targets: ``(B,)`` integer labels.
        weight: optional ``(C,)`` class weights.
        label_smoothing: ``eps`` in [0, 1).
    """
    logp = F.log_softmax(logits.float(), dim=1)
    nll = -logp.gather(1, targets.long().unsqueeze(1)).squeeze(1)
    per_sample = nll
    if label_smoothing:
        per_sample = (1.0 - label_smoothing) * nll - label_smoothing * logp.mean(dim=1)
    if weight is None:
        return per_sample.mean()
    w = weight.to(per_sample)[targets.long()]
    return (w * per_sample).sum() / w.sum()


def kl_div_batchmean(student_log_probs: Tensor, teacher_probs: Tensor) -> Tensor:
    """``KL(p_t || p_s)`` summed over classes and averaged over rows; 0 for an empty batch.

    ``KL = (1/B) * sum_i sum_c p_t[i,c] * (log p_t[i,c] - log p_s[i,c])`` with ``0 log 0 = 0``.
    """
    if student_log_probs.shape[0] == 0:
        return student_log_probs.sum() * 0.0
    return F.kl_div(student_log_probs, teacher_probs, reduction="batchmean")


def kd_kl_div(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Hinton et al. (2015), "Distilling the Knowledge in a Neural Network", soft-target term.

    ``T^2 * (1/B) * sum_i KL( softmax(t_i / T) || softmax(s_i / T) )``; the ``T^2`` keeps the
    gradient scale independent of ``T`` (Hinton et al., Sec. 2). SSD-KD's Eq. 2 writes the
    batch *sum*; its code divides by B, which is what we do.
    """
    t = float(temperature)
    log_ps = F.log_softmax(student_logits.float() / t, dim=1)
    pt = F.softmax(teacher_logits.float() / t, dim=1)
    return t * t * kl_div_batchmean(log_ps, pt)


def hinton_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    *,
    alpha: float,
    temperature: float,
    weight: Tensor | None = None,
) -> Tensor:
    """Hinton KD / SSD-KD's BLKD (Eq. 4): ``(1 - alpha) * WCE + alpha * T^2 * KL``.

    Config example: ``{"alpha": 0.5, "temperature": 5.0}`` (SSD-KD code).
    """
    ce = weighted_cross_entropy(student_logits, targets, weight)
    return (1.0 - alpha) * ce + alpha * kd_kl_div(student_logits, teacher_logits, temperature)


def logit_mse(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """SkinDistilViT's logit MSE (SkinDistilViT code: ``MSELoss(reduction="sum") / B``).

    ``(1/B) * sum_i sum_c (s_ic - t_ic)^2`` -- summed over classes, so C times the element mean.
    """
    diff = student_logits.float() - teacher_logits.float()
    return diff.pow(2).sum() / student_logits.shape[0]


def hidden_cosine_loss(student_hidden: Tensor, teacher_hidden: Tensor) -> Tensor:
    """SkinDistilViT / DistilBERT (Sanh et al. 2019) cosine loss between hidden states.

    Every token row of ``(B, N, D)`` counts (SkinDistilViT code flattens to ``(B*N, D)``)::

        L_cos = mean_rows ( 1 - cos(h_s[row], h_t[row]) )
    """
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(
            f"hidden_cosine_loss: shapes differ, student {tuple(student_hidden.shape)} vs teacher "
            f"{tuple(teacher_hidden.shape)}; map the student through an adapter first"
        )
    d = student_hidden.shape[-1]
    s, t = student_hidden.float().reshape(-1, d), teacher_hidden.float().reshape(-1, d)
    cos = F.cosine_similarity(s, t, dim=1)
    return (1.0 - cos).mean()


def fitnet_hint_loss(regressed_student: Tensor, teacher_map: Tensor) -> Tensor:
    """FitNets (Romero et al. 2015), hint loss ``mean((r(f_s) - f_t)^2)`` over all elements.

    ``r`` is the learned regressor (a 1x1 conv adapter) applied before calling this function.
    """
    return F.mse_loss(regressed_student.float(), teacher_map.float())


def pairwise_distances(x: Tensor, eps: float = 1e-12) -> Tensor:
    """Euclidean distance matrix ``D_ij = ||x_i - x_j||`` of ``(B, D)`` rows, zero diagonal.

    Uses ``||x_i||^2 + ||x_j||^2 - 2<x_i, x_j>`` clamped at ``eps`` before the square root, so
    the gradient stays finite for (near-)identical rows.
    """
    x = x.float()
    sq = x.pow(2).sum(dim=1)
    d2 = (sq.unsqueeze(0) + sq.unsqueeze(1) - 2.0 * x @ x.t()).clamp(min=eps)
    eye = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    return d2.sqrt().masked_fill(eye, 0.0)


def _mean_normalised_distances(x: Tensor) -> Tensor:
    d = pairwise_distances(x)
    n_pos = (d > 0).sum().clamp(min=1)
    return d / (d.sum() / n_pos).clamp(min=1e-12)


def rkd_distance_loss(student_emb: Tensor, teacher_emb: Tensor) -> Tensor:
    """RKD distance-wise loss, Park et al. (2019), "Relational Knowledge Distillation", Sec. 3.2.

    ``psi_D(t_i, t_j) = ||t_i - t_j|| / mu`` with ``mu`` the mean over the distinct pairs, then
    ``L_D = mean_{i,j} huber(psi_D^s - psi_D^t)`` over all ``B^2`` entries (Huber delta 1,
    i.e. smooth-L1), as in the authors' code. The two embeddings may have different widths.
    """
    with torch.no_grad():
        t = _mean_normalised_distances(teacher_emb)
    s = _mean_normalised_distances(student_emb)
    return F.smooth_l1_loss(s, t)


def _angle_potentials(x: Tensor) -> Tensor:
    # e[i, j] = unit(x_j - x_i); a[i, j, k] = <e_ij, e_ik> = cos of the angle at vertex i.
    x = x.float()
    e = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), p=2, dim=2)
    return torch.bmm(e, e.transpose(1, 2))


def rkd_angle_loss(student_emb: Tensor, teacher_emb: Tensor) -> Tensor:
    """RKD angle-wise loss, Park et al. (2019), Sec. 3.2.

    ``psi_A(t_i, t_j, t_k) = <e_ij, e_ik>`` with ``e_ij = (t_j - t_i) / ||t_j - t_i||`` (cosine
    of the angle at ``t_i``; zero vector when ``j = i``), then
    ``L_A = mean_{i,j,k} huber(psi_A^s - psi_A^t)`` over all ``B^3`` entries (smooth-L1).
    """
    with torch.no_grad():
        t = _angle_potentials(teacher_emb)
    return F.smooth_l1_loss(_angle_potentials(student_emb), t)


def channel_gram(feature_map: Tensor) -> Tensor:
    """Per-sample channel Gram matrix of SSD-KD's CRKD (Eq. 6-8).

    With ``F_i`` the ``(C, H*W)`` matrix of sample ``i``: ``G_i = F_i F_i^T / (C * H * W)``,
    i.e. ``G_i[k, k'] = <vec f_k, vec f_k'> / (C H W)``. Returns ``(B, C, C)``.
    """
    b, c, h, w = feature_map.shape
    f = feature_map.float().reshape(b, c, h * w)
    return torch.bmm(f, f.transpose(1, 2)) / (c * h * w)


def crkd_loss(student_map: Tensor, teacher_map: Tensor, form: str = "rmse") -> Tensor:
    """Channel relational KD (CRKD), Wang et al. (2023), SSD-KD Eq. 8.

    ``student_map`` must already be mapped to the teacher's channels and size (1x1 conv adapter).

    - ``form="rmse"`` (SSD-KD code, for which lambda_crkd = 1000 was tuned):
      ``sqrt( mean_{i,k,k'} (G^s_i - G^t_i)[k,k']^2 )``.
    - ``form="frobenius"`` (the paper's Eq. 8, averaged instead of summed over the batch):
      ``mean_i || G^s_i - G^t_i ||_F``.
    """
    if student_map.shape != teacher_map.shape:
        raise ValueError(
            f"crkd_loss: student map {tuple(student_map.shape)} and teacher map "
            f"{tuple(teacher_map.shape)} differ; adapt channels and size first"
        )
    with torch.no_grad():
        gt = channel_gram(teacher_map)
    diff = channel_gram(student_map) - gt
    if form == "rmse":
        return diff.pow(2).mean().clamp(min=1e-24).sqrt()
    if form == "frobenius":
        return diff.pow(2).sum(dim=(1, 2)).clamp(min=1e-24).sqrt().mean()
    raise ValueError(f"crkd_loss: form={form!r} is not one of 'rmse', 'frobenius'")


def _split_target(logits: Tensor, targets: Tensor, t: float) -> tuple[Tensor, Tensor]:
    """Log-probabilities of target vs rest (binary) and of the non-target classes (C-1)."""
    z = logits.float() / t
    mask = F.one_hot(targets.long(), z.shape[1]).bool()
    lse_all = torch.logsumexp(z, dim=1)
    z_nt = z[~mask].reshape(z.shape[0], z.shape[1] - 1)
    lse_nt = torch.logsumexp(z_nt, dim=1)
    log_b = torch.stack([z[mask] - lse_all, lse_nt - lse_all], dim=1)
    return log_b, F.log_softmax(z_nt, dim=1)


def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    *,
    alpha: float,
    beta: float,
    temperature: float,
) -> tuple[Tensor, Tensor]:
    """Decoupled KD, Zhao et al. (2022), "Decoupled Knowledge Distillation", Sec. 3.

    With ``b = [p_target, 1 - p_target]`` and ``p_hat`` the softmax over the non-target classes
    (all at temperature ``T``)::

        TCKD = T^2 * KL(b^t || b^s),  NCKD = T^2 * KL(p_hat^t || p_hat^s)   (both batch means)
        DKD  = alpha * TCKD + beta * NCKD

    Returns ``(alpha * TCKD, beta * NCKD)`` so a method can log them separately.
    """
    t = float(temperature)
    log_bs, log_ns = _split_target(student_logits, targets, t)
    with torch.no_grad():
        log_bt, log_nt = _split_target(teacher_logits, targets, t)
    tckd = kl_div_batchmean(log_bs, log_bt.exp()) * t * t
    nckd = kl_div_batchmean(log_ns, log_nt.exp()) * t * t
    return alpha * tckd, beta * nckd


def fcvit_probs_kl_chain(layer_logits: list[Tensor], num_enabled: int, temperature: float = 1.0) -> Tensor:
    """FCViTProbs KL chain, SkinDistilViT (Lungu-Stan et al. 2023), Sec. 3.2.

    Heads are ordered bottom to top, ``l = 0 .. L-1``. The ``num_enabled`` heads just below the
    top are switched on from the top down; each is pulled towards its upper neighbour, whose
    side is detached (it acts as a teacher)::

        L_KL = sum_{l = L-1-num_enabled}^{L-2} T^2 * KL( p_{l+1}^T.detach() || p_l^T )

    Returns 0 (with a graph) when ``num_enabled`` is 0.
    """
    n = len(layer_logits)
    k = max(0, min(int(num_enabled), n - 1))
    total = layer_logits[-1].float().sum() * 0.0
    for lower in range(n - 2, n - 2 - k, -1):
        total = total + kd_kl_div(layer_logits[lower], layer_logits[lower + 1].detach(), temperature)
    return total


def rotation_views(images: Tensor) -> Tensor:
    """SSKD's transformed views (Xu et al. 2020, Sec. 3): rotations by 0, 90, 180 and 270 degrees.

    Returns ``(4B, C, H, W)`` ordered ``[x, rot90(x), rot180(x), rot270(x)]``: the originals are
    the first ``B`` rows and row ``r * B + i`` of the last ``3B`` is image ``i`` rotated.
    """
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(
            f"rotation_views: images must be square to stack rotated views, got {tuple(images.shape[-2:])}; "
            "crop or resize to a square input size"
        )
    return torch.cat([torch.rot90(images, r, dims=(2, 3)) for r in range(4)], dim=0)


def sskd_similarity(original_rep: Tensor, transformed_rep: Tensor) -> Tensor:
    """SSKD's contrastive similarity matrix (Xu et al. 2020, Sec. 3).

    ``A[j, i] = cos(phi(t(x_j)), phi(x_i))``: one row per transformed view (``3B``), one column
    per original (``B``), from the projection-head outputs ``phi``.
    """
    a = F.normalize(transformed_rep.float(), dim=1)
    b = F.normalize(original_rep.float(), dim=1)
    return a @ b.t()


def sskd_contrastive_loss(similarity: Tensor) -> Tensor:
    """SSKD's teacher-prep objective for the teacher's projection head (Xu et al. 2020, Sec. 3).

    Each transformed view must recognise its own original: ``CE(A[j], source(j))`` with
    ``source(r * B + i) = i`` for the ``(3B, B)`` matrix of :func:`sskd_similarity`.
    """
    b = similarity.shape[1]
    target = torch.arange(b, device=similarity.device).repeat(similarity.shape[0] // b)
    return F.cross_entropy(similarity, target)


def selective_keep(teacher_scores: Tensor, targets: Tensor, keep_ratio: float) -> Tensor:
    """SSKD's selective transfer (Xu et al. 2020, Sec. 3): which rows the teacher gets right.

    Rows whose target the teacher ranks first are always kept; of the others, the
    ``int(n_wrong * keep_ratio)`` whose target has the best (smallest) rank are kept too.
    Returns the kept row indices in ascending order.
    """
    order = teacher_scores.argsort(dim=1, descending=True)
    rank = (order == targets.long().unsqueeze(1)).float().argmax(dim=1)
    n_wrong = int((rank > 0).sum())
    n_keep = teacher_scores.shape[0] - n_wrong + int(n_wrong * float(keep_ratio))
    by_rank = torch.sort(rank, stable=True).indices
    return by_rank[:n_keep].sort().values
