"""SafetyMonitor: the request monitor and the integrity monitor behind one object."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from circuitlab.core.model import HookedModel
from circuitlab.monitor.integrity import IntegrityMonitor, IntegrityReport
from circuitlab.monitor.request import RequestCheck, RequestMonitor

__all__ = ["SafetyMonitor"]


@dataclass
class SafetyMonitor:
    """``check(prompts)`` flags harmful requests (one forward pass up to the monitored layer);
    ``verify()`` checks the model's safety components against the trusted reference."""

    model: HookedModel
    request: RequestMonitor
    integrity: IntegrityMonitor | None = None

    def check(self, prompts: Sequence[str], *, batch_size: int = 16) -> RequestCheck:
        return self.request.check(self.model, prompts, batch_size=batch_size)

    def verify(self) -> IntegrityReport:
        if self.integrity is None:
            raise ValueError("this SafetyMonitor has no integrity monitor; build one with IntegrityMonitor.fit")
        return self.integrity.check(self.model)
