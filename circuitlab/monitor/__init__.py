"""Runtime safety monitoring built from the located refusal components.

- :mod:`.request`: flag harmful requests from activations before generation (``RequestMonitor``).
- :mod:`.integrity`: detect tampering with the safety components (``IntegrityMonitor``).
- :mod:`.locate`: the components and direction the monitors watch.
- :class:`SafetyMonitor` bundles both monitors.

The tamperings the integrity monitor is evaluated against live in ``circuitlab.tampering`` (one of
them fine-tunes, so they sit above both this package and ``circuitlab.finetune``).
"""

from .integrity import IntegrityMonitor, IntegrityReport, count_foreign_hooks
from .locate import locate_components
from .request import RequestCheck, RequestMonitor, detection_metrics, fit_request_monitor
from .safety import SafetyMonitor

__all__ = ["SafetyMonitor", "RequestMonitor", "RequestCheck", "fit_request_monitor", "detection_metrics",
           "IntegrityMonitor", "IntegrityReport", "count_foreign_hooks", "locate_components"]
