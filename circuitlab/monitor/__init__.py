"""Runtime safety monitoring built from the located refusal components.

- :mod:`.request`: flag harmful requests from activations before generation (``RequestMonitor``).
- :mod:`.integrity`: detect tampering with the safety components (``IntegrityMonitor``).
- :mod:`.locate`: the components and direction the monitors watch.
- :class:`SafetyMonitor` bundles both monitors.

The tamperings the integrity monitor is evaluated against live in ``circuitlab.defence.tampering`` (one of
them fine-tunes, so they sit above both this package and ``circuitlab.defence.finetune``).
"""

from circuitlab.monitor.integrity import IntegrityMonitor, IntegrityReport, count_foreign_hooks
from circuitlab.monitor.locate import locate_components
from circuitlab.monitor.request import RequestCheck, RequestMonitor, detection_metrics, fit_request_monitor
from circuitlab.monitor.safety import SafetyMonitor

__all__ = ["SafetyMonitor", "RequestMonitor", "RequestCheck", "fit_request_monitor", "detection_metrics",
           "IntegrityMonitor", "IntegrityReport", "count_foreign_hooks", "locate_components"]
