"""Hook factories shared by every experiment: directional ablation, activation addition, weight
orthogonalization (+ export), and zero / mean / resample ablation of components.

Every factory returns a plain list of ``(hook_name, fn)`` pairs: concatenate lists to compose
interventions, and apply them with ``with model.hooks(hooks): ...`` or pass them as ``fwd_hooks=``
to ``model.last_logits`` / ``metrics.*`` / ``model.generate``; they are removed on exit, so nothing
leaves a trace. Hooks act on whole batches and are safe under left padding: they either act at
every position identically or address positions by negative offsets from the end.

References: directional ablation, activation addition and weight orthogonalization follow
Arditi et al. 2024, "Refusal in Language Models Is Mediated by a Single Direction" (§2.4, §4.1).
Mean and resample ablation follow Wang et al. 2022 (IOI, mean ablation) and Chan et al. 2022
(causal scrubbing, resample ablation).
"""

from __future__ import annotations

import contextlib
import json
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import torch

from circuitlab.core import hooks as hk
from circuitlab.core.components import Component, hook_name, kind_info
from circuitlab.methods.directions import check_strength, orthogonalize_weights, project_out, unit
from circuitlab.core.model import HookedModel
from circuitlab.io.store import ActivationStore
from circuitlab.core.weights import canonical_name, residual_writers, weights_restored

__all__ = [
    "directional_ablation_hooks", "activation_addition_hooks", "orthogonalized", "export_hf",
    "ablation_hooks", "reference_activations", "ABLATION_METHODS",
]

ABLATION_METHODS = ("zero", "mean", "resample")


# ---- directions --------------------------------------------------------------------------------

def directional_ablation_hooks(model: HookedModel, direction: torch.Tensor, *, strength: float = 1.0,
                               layers: Sequence[int] | None = None) -> list:
    """Project the unit ``direction`` out of the residual stream everywhere (Arditi et al. 2024, §2.4).

    Hooks ``resid_pre``, ``attn_out`` and ``mlp_out`` of every layer (or of ``layers``), so no
    component can write the direction back. ``strength`` < 1 removes only that fraction.
    """
    r_hat = unit(direction, model.d_model)
    check_strength(strength)

    def ablate(act, hook):
        return project_out(act, r_hat, strength)

    layers = range(model.n_layers) if layers is None else layers
    return [(build(l), ablate) for l in layers for build in (hk.resid_pre, hk.attn_out, hk.mlp_out)]


def activation_addition_hooks(model: HookedModel, direction: torch.Tensor, layer: int, coeff: float = 1.0,
                              positions: Sequence[int] | None = None) -> list:
    """Add ``coeff * direction`` to ``resid_pre(layer)`` (Arditi et al. 2024, §2.4, activation addition).

    ``direction`` is used as given (not normalised: the paper adds the difference-in-means vector).
    ``positions=None`` adds at every position (prompt and generated tokens); otherwise negative
    offsets from the end of each forward's input (left padding keeps these on real tokens).
    """
    vec = torch.as_tensor(direction).detach().float().flatten()
    if vec.numel() != model.d_model:
        raise ValueError(f"direction has {vec.numel()} entries but the model's d_model is {model.d_model}")
    if positions is not None:
        positions = list(positions)
        if not positions or not all(isinstance(p, int) and p < 0 for p in positions):
            raise ValueError(f"positions must be None or negative offsets such as [-1], got {positions!r}")

    def add(act, hook):
        delta = (coeff * vec).to(device=act.device, dtype=act.dtype)
        if positions is None:
            return act + delta
        out = act.clone()
        usable = [p for p in positions if -p <= act.shape[1]]  # a 1-token decoding step has only -1
        out[:, usable] += delta
        return out

    return [(hk.resid_pre(layer), add)]


# ---- weight orthogonalization ------------------------------------------------------------------

@contextlib.contextmanager
def orthogonalized(model: HookedModel, direction: torch.Tensor, strength: float = 1.0):
    """Temporarily orthogonalize ``model``'s weights against ``direction`` (``directions.orthogonalize_weights``,
    Arditi et al. 2024 §4.1); the residual writers and the embedding tying are restored on exit."""
    with weights_restored(model, [name for name, _, _ in residual_writers(model)]):
        orthogonalize_weights(model, direction, strength)
        yield model


def export_hf(model: HookedModel, path) -> Path:
    """Save the (possibly edited) weights as ``model.safetensors`` + config + tokenizer.

    The folder loads with ``transformers.AutoModelForCausalLM.from_pretrained(path)`` and with
    ``circuitlab.load_model(path)``.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hf = model.hf_model
    state = {}
    for name, tensor in hf.state_dict().items():
        state[canonical_name(name)] = tensor.detach().cpu().contiguous().clone()
    if getattr(hf.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied: transformers rebuilds it from the embedding
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    hf.config.save_pretrained(path)
    model.tokenizer.save_pretrained(path)
    (path / "circuitlab_export.json").write_text(json.dumps({"source": model.name, "fingerprint": model.fingerprint}))
    return path


# ---- component ablation --------------------------------------------------------------------------

def _group(components: Sequence[Component]) -> dict[str, list[Component]]:
    groups: dict[str, list[Component]] = defaultdict(list)
    for c in components:
        if not isinstance(c, Component):
            raise TypeError(f"components must be circuitlab.core.components.Component, got {type(c).__name__}")
        groups[hook_name(c)].append(c)
    return dict(groups)


def _selector(model: HookedModel, comps: list[Component]):
    """(dimension from the end, index tensor or None for the whole activation) of a hook's components."""
    kind = comps[0].kind
    axis = kind_info(kind).unit_axis
    if axis is not None:
        limit = model.d_mlp if kind == "neuron" else model.n_heads
        idx = sorted({c.index for c in comps})
        if idx[0] < 0 or idx[-1] >= limit:
            raise ValueError(f"{kind} index out of range 0..{limit - 1} in layer {comps[0].layer}: {idx}")
        return axis, torch.tensor(idx)
    return None, None


def reference_activations(model: HookedModel, components: Sequence[Component], prompts, store=None, *,
                          chat: bool = True, batch_size: int = 16) -> dict[str, torch.Tensor]:
    """Per-prompt token-mean activations ``{hook: [n_ref, ...]}`` at the components' hooks.

    Read through the ActivationStore (positions ``'mean'``: each prompt's mean over its real tokens).
    ``ablation_hooks(method='mean')`` uses their mean over prompts; ``'resample'`` uses one random
    reference prompt's row per ablated prompt.
    """
    store = store if store is not None else ActivationStore()
    names = sorted(_group(components))
    acts = store.get(model, list(getattr(prompts, "prompts", prompts)), names, "mean", chat=chat,
                     batch_size=batch_size, progress=False)
    return {n: acts[n] for n in names}


def ablation_hooks(model: HookedModel, components: Sequence[Component], method: str = "zero",
                   strength: float = 1.0, reference=None, seed: int = 0, *, store=None) -> list:
    """Hooks that ablate ``components`` (neurons via mlp_post, heads via attn_z, whole layer outputs).

    - ``zero``: set to 0.
    - ``mean``: set to the mean over ``reference`` prompts and their tokens (Wang et al. 2022).
    - ``resample``: set each prompt's activation to that of a random reference prompt (its token
      mean), drawn with ``seed``; the same draw for every hook of one forward pass, so all
      ablated components come from the same reference prompt (Chan et al. 2022).

    The replacement is applied at every position (position-independent, so safe under left
    padding and during generation). ``strength`` in [0, 1] interpolates: ``a + s * (target - a)``.
    ``reference``: the dict from ``reference_activations`` or a list / PromptSet of prompts.
    """
    if method not in ABLATION_METHODS:
        raise ValueError(f"method {method!r} is not one of {', '.join(ABLATION_METHODS)}")
    check_strength(strength)
    groups = _group(components)
    if not groups:
        return []
    model.check_hooks(list(groups))
    if method != "zero":
        if reference is None:
            raise ValueError(f"method={method!r} needs reference= prompts (or reference_activations(...))")
        if not isinstance(reference, dict):
            reference = reference_activations(model, components, reference, store)
        missing = [n for n in groups if n not in reference]
        if missing:
            raise ValueError(f"reference activations lack hooks {missing}; build them from the same components")
    return [(name, _make_ablation(model, comps, method, strength, reference, seed))
            for name, comps in groups.items()]


def _make_ablation(model, comps, method, strength, reference, seed):
    dim, idx = _selector(model, comps)
    name = hook_name(comps[0])
    ref = None if method == "zero" else reference[name].float()
    mean = None if ref is None else ref.mean(0)

    def target_for(act: torch.Tensor) -> torch.Tensor:
        """Replacement values broadcastable to ``act`` ``[batch, pos, ...]``."""
        if method == "zero":
            return torch.zeros((), dtype=act.dtype, device=act.device)
        if method == "mean":
            return mean.to(act).unsqueeze(0).unsqueeze(0)
        rows = torch.randint(len(ref), (act.shape[0],), generator=torch.Generator().manual_seed(seed))
        return ref[rows].to(act).unsqueeze(1)

    def ablate(act, hook):
        target = target_for(act).expand_as(act)
        if idx is None:
            return act + strength * (target - act)
        out = act.clone()
        i = idx.to(act.device)
        sel = act.index_select(act.dim() + dim, i)
        out.index_copy_(act.dim() + dim, i, sel + strength * (target.index_select(act.dim() + dim, i) - sel))
        return out

    return ablate
