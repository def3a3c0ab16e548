"""Circuit Breakers' representation rerouting (Zou et al. 2024, "Improving Alignment and Robustness
with Circuit Breakers", §3 and Algorithm 1) as an extra loss for ``finetune.train(rerouting=...)``.

At the chosen layers (``resid_pre``), on the harmful (hardening) rows' prompt tokens the loss
pushes the trained model's representation away from the ORIGINAL model's (rerouting:
``ReLU(cos(h_now, h_orig))``), and on the retain rows keeps it where it was (retain:
``||h_now - h_orig||_2`` per token). The paper's schedule: ``c_rr = alpha (1 - t / 2T)``,
``c_retain = alpha t / 2T`` at step t of T. The paper trains LoRA adapters and reads the original
by switching them off; here any masked parameter set trains, and the original representations are
read in a no-gradient forward with the trained tensors' starting values swapped back in (exact for
the same batch; costs one extra forward per step and a copy of the trained tensors — the whole
model for ``full``, where the paper's LoRA is the lean choice).

What differs from the paper (documented in docs/guide/robust_safety.md): the paper reroutes the
representations of harmful COMPLETIONS, which circuitlab never ships; here the harmful prompt's own
tokens (up to the end of the chat template) are rerouted, and the hardening's refusal targets stay in
the loss, so the model is taught to refuse from the rerouted state.
"""

from __future__ import annotations

from typing import Sequence

import torch

from circuitlab.core import hooks as hk

__all__ = ["Rerouting", "default_layers"]


def default_layers(n_layers: int) -> list[int]:
    """The paper's placement (layers 10 and 20 of Llama-3-8B's 32): one third and two thirds of the depth."""
    return sorted({max(0, round(n_layers / 3)), min(n_layers - 1, round(2 * n_layers / 3))})


class Rerouting:
    """The rerouting + retain representation loss of Circuit Breakers on ``layers``.

    ``train`` calls ``reference(model, params, ids, mask)`` before its forward pass (the original's
    representations), adds ``hooks()`` to that forward pass (which records the trained ones), then
    ``loss(step, steps, prompt_rows, retain_rows)``. ``history``: the per-step parts.
    """

    def __init__(self, layers: Sequence[int], *, alpha: float = 10.0):
        if not layers:
            raise ValueError("rerouting needs at least one layer (e.g. default_layers(model.n_layers))")
        if alpha <= 0:
            raise ValueError(f"alpha={alpha} must be > 0 (the paper uses 10)")
        self.layers, self.alpha = sorted(set(layers)), alpha
        self.start: dict[str, torch.Tensor] = {}  # the trained tensors' values before the first step
        self._now: dict[int, torch.Tensor] = {}
        self._orig: dict[int, torch.Tensor] = {}
        self.history: list[dict] = []

    def check(self, model) -> None:
        bad = [l for l in self.layers if not 0 <= l < model.n_layers]
        if bad:
            raise ValueError(f"rerouting layers {bad} are not in 0..{model.n_layers - 1}")

    def reference(self, model, params: dict[str, torch.nn.Parameter], ids, mask) -> None:
        """The original model's representations of this batch (no gradient): starting values swapped in."""
        with torch.no_grad():
            if not self.start:
                self.start = {n: p.detach().clone() for n, p in params.items()}
            trained = {n: p.data for n, p in params.items()}
            for n, p in params.items():  # point at the starting values: no copy of the trained ones per step
                p.data = self.start[n]
            try:
                with model.hooks(self._recording(self._orig, detach=True)):
                    model.final_residual(ids, mask)
            finally:
                for n, p in params.items():
                    p.data = trained[n]

    def hooks(self) -> list:
        """Hooks that record the trained model's representations (with their graph) during ``train``'s pass."""
        return self._recording(self._now, detach=False)

    def _recording(self, into: dict, *, detach: bool) -> list:
        def record(layer):
            def fn(act, hook):
                into[layer] = act.detach() if detach else act
                return act
            return fn
        return [(hk.resid_pre(l), record(l)) for l in self.layers]

    def loss(self, step: int, steps: int, reroute_at: torch.Tensor, retain_at: torch.Tensor) -> torch.Tensor:
        """``c_rr · mean ReLU(cos)`` over ``reroute_at`` + ``c_retain · mean L2`` over ``retain_at``
        (bool ``[batch, seq]`` masks of the token positions), averaged over layers."""
        c_rr = self.alpha * (1 - step / (2 * max(steps, 1)))
        c_retain = self.alpha * step / (2 * max(steps, 1))
        rr, ret = [], []
        for l in self.layers:
            now, orig = self._now[l].float(), self._orig[l].float()
            if reroute_at.any():
                rr.append(torch.relu(torch.nn.functional.cosine_similarity(now[reroute_at], orig[reroute_at], dim=-1))
                          .mean())
            if retain_at.any():
                ret.append((now[retain_at] - orig[retain_at]).norm(dim=-1).mean())
        zero = self._now[self.layers[0]].new_zeros((), dtype=torch.float32)
        l_rr = torch.stack(rr).mean() if rr else zero
        l_ret = torch.stack(ret).mean() if ret else zero
        self._now.clear()
        self._orig.clear()
        self.history.append({"step": step, "reroute_cos": float(l_rr.detach()), "retain_l2": float(l_ret.detach()),
                             "c_rr": c_rr, "c_retain": c_retain})
        return c_rr * l_rr + c_retain * l_ret
