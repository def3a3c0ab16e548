"""Directions in the residual stream: difference in means, unit vectors, projection, and weight
orthogonalization — one implementation each.

- ``diff_in_means`` / ``mean_differences``: ``mean(harmful) − mean(harmless)`` of activations, the
  refusal-direction candidate of Arditi et al. 2024, "Refusal in Language Models Is Mediated by a
  Single Direction", §2.3 (the contrastive activation difference of Turner et al. 2023 /
  Rimsky et al. 2024).
- ``subspace_basis``: an orthonormal rank-k refusal subspace from activations (Wollschläger et al.
  2025, "The Geometry of Refusal in Large Language Models": refusal is mediated by several
  directions), shared by ``defence.attacks``' rank-k attack and ``abliteration``'s cone family.
- ``orthogonalize_weights``: ``W ← W − s · r̂ r̂ᵀ W`` on every matrix (and bias) that writes the
  residual stream (Arditi et al. 2024, §4.1), computed on each weight's own device and dtype.
- ``write_profile``: ``Wᵀ r̂`` of those matrices — what orthogonalization sends to zero.
- ``direction_from_pairs``: one direction from paired (or randomly paired) activations, the one
  implementation behind difference in means (``method="mean"``) and LAT reading vectors
  (``method="pca"``, ``lat_direction``: Zou et al. 2023, "Representation Engineering", §3.1.1
  Linear Artificial Tomography); ``reading_accuracy`` / ``projection_threshold`` read them out.
"""

from __future__ import annotations

from typing import Sequence

import torch

from circuitlab.core import hooks as hk
from circuitlab.io.store import ActivationStore
from circuitlab.core.weights import original, residual_writers

__all__ = ["unit", "project_out", "check_strength", "diff_in_means", "mean_differences", "refusal_direction",
           "candidate_directions", "subspace_basis", "orthogonalize_weights", "write_profile", "paired_differences",
           "direction_from_pairs", "lat_direction", "projection_threshold", "reading_accuracy", "PAIR_METHODS"]

PAIR_METHODS = ("mean", "pca")


def unit(direction: torch.Tensor, d_model: int | None = None) -> torch.Tensor:
    """``direction`` as a float32 unit vector (clear error for a wrong shape or a zero vector)."""
    direction = torch.as_tensor(direction).detach().float().flatten()
    if d_model is not None and direction.numel() != d_model:
        raise ValueError(f"direction has {direction.numel()} entries but the model's d_model is {d_model}")
    norm = direction.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError("direction must be a finite, non-zero vector")
    return direction / norm


def project_out(act: torch.Tensor, r_hat: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """``act - strength * (act · r̂) r̂`` over the last dimension (r̂ a unit vector, moved to ``act``)."""
    r = r_hat.to(device=act.device, dtype=act.dtype)
    return act - strength * (act @ r).unsqueeze(-1) * r


def check_strength(strength: float) -> None:
    """``strength`` must lie in [0, 1] (0 = no change, 1 = the full intervention)."""
    if isinstance(strength, bool) or not 0.0 <= float(strength) <= 1.0:
        raise ValueError(f"strength must be in [0, 1] (0 = no change, 1 = full ablation), got {strength}")


def diff_in_means(harmful, harmless):
    """``mean(harmful) − mean(harmless)`` over the first (prompt) axis; tensors or numpy arrays."""
    return harmful.mean(0) - harmless.mean(0)


def mean_differences(model, harmful, harmless, names: Sequence[str], positions="last", *,
                     store: ActivationStore | None = None, batch_size: int = 16,
                     progress: bool = False) -> dict[str, torch.Tensor]:
    """``{hook: mean(harmful) − mean(harmless)}`` read through the ActivationStore at ``positions``
    (shape ``[n_positions, ...]``, or ``[...]`` for ``'mean'``)."""
    store = store if store is not None else ActivationStore()
    acts = [store.get(model, list(getattr(s, "prompts", s)), list(names), positions, batch_size=batch_size,
                      progress=progress) for s in (harmful, harmless)]
    return {n: diff_in_means(acts[0][n], acts[1][n]) for n in names}


def refusal_direction(model, harmful, harmless, layer: int, *, store: ActivationStore | None = None,
                      batch_size: int = 16) -> torch.Tensor:
    """Difference in means of ``resid_pre(layer)`` at the last prompt token, ``[d_model]`` (§2.3)."""
    name = hk.resid_pre(layer)
    return mean_differences(model, harmful, harmless, [name], "last", store=store, batch_size=batch_size)[name][0]


def candidate_directions(model, harmful, harmless, store: ActivationStore | None = None, *, batch_size: int = 16,
                         progress: bool = False) -> dict[tuple[int, int], torch.Tensor]:
    """Difference in means of ``resid_pre`` at every (layer, post-instruction offset) (§2.3)."""
    names = [hk.resid_pre(l) for l in range(model.n_layers)]
    diffs = mean_differences(model, harmful, harmless, names, "post", store=store, batch_size=batch_size,
                             progress=progress)
    return {(l, o): diffs[hk.resid_pre(l)][j] for l in range(model.n_layers)
            for j, o in enumerate(range(-model.n_post, 0))}


def subspace_basis(harmful_acts: Sequence[torch.Tensor], harmless_acts: Sequence[torch.Tensor], k: int) -> torch.Tensor:
    """Orthonormal ``[k', d_model]`` (k' = min(k, what the data supports)) refusal subspace from per-key activations.

    ``harmful_acts[j]``, ``harmless_acts[j]``: ``[n, d_model]`` at key j (one layer × offset), each key
    centred on its harmless mean and scaled to unit mean harmful-row norm, then pooled. Vector 1: the pooled
    difference in means (so rank 1 is the diff-in-means attack). Vectors 2..k: with it projected out, the
    directions where harmful prompts vary MORE than harmless ones do — the top generalized eigenvectors of
    the harmful second moment against the harmless covariance (ridge: its mean eigenvalue) — i.e. the
    directions along which families of harmful prompts carry refusal differently (a refusal cone's
    other edges), not the prompt-to-prompt variation both classes share."""
    if k < 1 or not harmful_acts or len(harmful_acts) != len(harmless_acts):
        raise ValueError(f"need k >= 1 and as many harmful as harmless keys; got k={k}, "
                         f"{len(harmful_acts)} vs {len(harmless_acts)} keys")
    hs, ss = [], []
    for h, s in zip(harmful_acts, harmless_acts):
        mean = s.float().mean(0)
        scale = (h.float() - mean).norm(dim=-1).mean().clamp_min(1e-8)
        hs.append((h.float() - mean) / scale)
        ss.append((s.float() - mean) / scale)
    h, s = torch.cat(hs), torch.cat(ss)
    first = h.mean(0)
    if first.norm() < 1e-6:
        raise ValueError("harmful and harmless means coincide at every key: no refusal direction to start from")
    basis = [first / first.norm()]
    if k > 1:
        q = basis[0][:, None]
        h, s = h - (h @ q) @ q.T, s - (s @ q) @ q.T
        c_h, c_s = h.T @ h / len(h), s.T @ s / len(s)
        ridge = torch.eye(len(c_s)) * c_s.diagonal().mean().clamp_min(1e-8)
        evals, evecs = torch.linalg.eigh(c_s + ridge)
        white = evecs @ torch.diag(evals.rsqrt()) @ evecs.T  # (C_s + λI)^(-1/2)
        gain, vecs = torch.linalg.eigh(white @ c_h @ white)
        for i in torch.argsort(gain, descending=True)[: k - 1]:
            if gain[i] <= 1e-6:
                break
            v = white @ vecs[:, i]
            for b in basis:  # Gram-Schmidt: keep the basis orthonormal
                v = v - (v @ b) * b
            if v.norm() > 1e-6:
                basis.append(v / v.norm())
    return torch.stack(basis)


def orthogonalize_weights(model, direction: torch.Tensor, strength: float = 1.0) -> None:
    """Edit weights in place so no component writes ``direction`` (Arditi et al. 2024, §4.1).

    ``W ← W − s · r̂ r̂ᵀ W`` for the token embedding, every attention output (o_proj) and MLP output
    (down_proj), and their biases if any. ``strength`` s in [0, 1] removes that fraction. r̂ is moved to
    each weight's device; the product is taken in float32 and cast back to the weight's dtype. With
    s = 1 this equals ``directional_ablation_hooks`` (tested). A tied unembedding is untied first, so
    the readout is unchanged, as with the hooks (``weights.weights_restored`` re-ties it).
    """
    r = unit(direction, model.d_model)
    check_strength(strength)
    hf = model.hf_model
    emb = original(hf.get_input_embeddings())
    head = original(hf.get_output_embeddings()) if hf.get_output_embeddings() is not None else None
    with torch.no_grad():
        if head is not None and head.weight.data_ptr() == emb.weight.data_ptr():
            head.weight = torch.nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
            hf.config.tie_word_embeddings = False
        for _, w, axis in residual_writers(model):
            rr, w32 = r.to(device=w.device), w.float()  # never a CPU direction times a GPU weight
            if w.dim() == 1:
                delta = (w32 @ rr) * rr
            elif axis == 1:  # embedding rows are residual vectors
                delta = torch.outer(w32 @ rr, rr)
            else:  # o_proj / down_proj columns are residual vectors
                delta = torch.outer(rr, rr @ w32)
            w -= (strength * delta).to(w.dtype)


def write_profile(model, direction: torch.Tensor) -> torch.Tensor:
    """``Wᵀ r̂`` for every residual writer (embedding, ``o_proj`` / ``down_proj`` and their biases),
    concatenated ``[n]`` (float32, CPU)."""
    r = unit(direction, model.d_model)
    parts = []
    for _, w, axis in residual_writers(model):
        w, rr = w.detach().float(), r.to(device=w.device)
        parts.append((w @ rr if axis == 1 or w.dim() == 1 else rr @ w).reshape(-1).cpu())
    return torch.cat(parts)


# ---- directions from paired activations (difference in means and LAT) ---------------------------

def _as_rows(x, name: str) -> torch.Tensor:
    """``x`` as a float64 ``[n, d]`` tensor (clear error for another shape, an empty or non-finite set)."""
    x = torch.as_tensor(x).detach().to(torch.float64)
    if x.dim() != 2 or len(x) == 0:
        raise ValueError(f"{name} must be a non-empty [n_prompts, d] array of activations, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} holds NaN or infinite activations")
    return x


def paired_differences(harmful, harmless, *, paired: bool = True, seed: int = 0) -> torch.Tensor:
    """``harmful[i] − harmless[j]`` for each pair ``[n_pairs, d]`` (float64).

    ``paired``: row i of both sets is a matched pair (equal counts required). Otherwise the sets are
    paired at random (seeded), ``min(n_harmful, n_harmless)`` pairs, as RepE does for unmatched stimuli.
    """
    h, s = _as_rows(harmful, "harmful"), _as_rows(harmless, "harmless")
    if h.shape[1] != s.shape[1]:
        raise ValueError(f"harmful and harmless activations differ in width: {h.shape[1]} vs {s.shape[1]}")
    if paired:
        if len(h) != len(s):
            raise ValueError(f"paired=True needs as many harmful as harmless rows, got {len(h)} and {len(s)} "
                             "(pass paired=False to pair them at random)")
        return h - s
    gen = torch.Generator().manual_seed(seed)
    n = min(len(h), len(s))
    return h[torch.randperm(len(h), generator=gen)[:n]] - s[torch.randperm(len(s), generator=gen)[:n]]


def direction_from_pairs(harmful, harmless, method: str = "mean", *, paired: bool = False,
                         seed: int = 0) -> torch.Tensor:
    """A direction ``[d]`` (float32) from paired activations ``[n, d]``: the one implementation of
    "a direction from paired activations".

    - ``mean``: ``diff_in_means`` over all rows (Arditi et al. 2024, §2.3; the mass-mean direction of
      Li et al. 2023), equal to the mean matched difference; not normalised; ``paired`` is moot.
    - ``pca``: LAT (Zou et al. 2023, §3.1.1 and the reference ``PCARepReader``): each pair's difference
      gets a random sign (the stimuli order within a pair is shuffled in RepE), the differences are
      centred, and the first principal component is the reading vector, unit length, its sign fixed
      so that harmful activations project higher than harmless ones on average.
    """
    if method not in PAIR_METHODS:
        raise ValueError(f"method={method!r} is not one of {', '.join(PAIR_METHODS)}")
    h, s = _as_rows(harmful, "harmful"), _as_rows(harmless, "harmless")
    if method == "mean":  # every row counts: the pairing cannot change a difference of means
        if h.shape[1] != s.shape[1]:
            raise ValueError(f"harmful and harmless activations differ in width: {h.shape[1]} vs {s.shape[1]}")
        return diff_in_means(h, s).float()
    diffs = paired_differences(h, s, paired=paired, seed=seed)
    if len(diffs) < 2:
        raise ValueError(f"LAT needs at least 2 pairs for a principal component, got {len(diffs)}")
    signs = torch.randint(0, 2, (len(diffs), 1), generator=torch.Generator().manual_seed(seed + 1)) * 2 - 1
    flipped = diffs * signs.to(diffs)
    flipped = flipped - flipped.mean(0)
    _, sv, vt = torch.linalg.svd(flipped, full_matrices=False)
    if sv[0] <= 0:
        raise ValueError("the paired differences are all zero: no direction separates the two sets")
    v = vt[0]
    if (h @ v).mean() < (s @ v).mean():  # RepE fixes the sign with the labels: harmful reads higher
        v = -v
    return v.float()


def lat_direction(harmful, harmless, *, paired: bool = False, seed: int = 0) -> torch.Tensor:
    """LAT reading vector (Zou et al. 2023): ``direction_from_pairs(..., method="pca")``, unit ``[d]``."""
    return direction_from_pairs(harmful, harmless, "pca", paired=paired, seed=seed)


def projection_threshold(harmful, harmless, direction) -> float:
    """Midpoint of the two class means of the projections on ``direction`` (fit on training rows)."""
    h, s = _as_rows(harmful, "harmful"), _as_rows(harmless, "harmless")
    v = unit(direction, h.shape[1]).to(torch.float64)
    return float(((h @ v).mean() + (s @ v).mean()) / 2)


def reading_accuracy(harmful, harmless, direction, threshold: float | None = None) -> float:
    """How well projection on ``direction`` reads harmful vs harmless activations ``[n, d]``.

    ``threshold`` given (from ``projection_threshold`` on training rows): the fraction of rows on the
    right side (harmful above it). ``None``: the pairwise accuracy of Zou et al. 2023 — the fraction of
    matched pairs (row i of both sets) whose harmful member projects higher.
    """
    h, s = _as_rows(harmful, "harmful"), _as_rows(harmless, "harmless")
    v = unit(direction, h.shape[1]).to(torch.float64)
    ph, ps = h @ v, s @ v
    if threshold is None:
        if len(h) != len(s):
            raise ValueError(f"pairwise reading accuracy needs matched pairs (equal counts), got {len(h)} and "
                             f"{len(s)}; pass threshold= (projection_threshold on training rows) instead")
        return float((ph > ps).double().mean())
    return float(torch.cat([ph > threshold, ps <= threshold]).double().mean())
