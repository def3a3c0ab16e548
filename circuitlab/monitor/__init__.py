"""Runtime safety monitoring built from the located refusal components.

- :mod:`.request`: flag harmful requests from activations before generation (``RequestMonitor``).
- :mod:`.integrity`: detect tampering with the safety components (``IntegrityMonitor``).
- :mod:`.tamper`: the tamperings and benign changes they are evaluated against.
- :class:`SafetyMonitor` bundles both.
"""

from .integrity import IntegrityMonitor, IntegrityReport, count_foreign_hooks, write_profile
from .request import RequestCheck, RequestMonitor, detection_metrics, fit_request_monitor
from .evaluate import DEFAULT_CHANGES, evaluate_integrity
from .locate import locate_components, mean_difference
from .safety import SafetyMonitor
from .tamper import BENIGN, TAMPERINGS, apply_change, weights_restored

__all__ = ["SafetyMonitor", "RequestMonitor", "RequestCheck", "fit_request_monitor", "detection_metrics",
           "IntegrityMonitor", "IntegrityReport", "write_profile", "count_foreign_hooks",
           "TAMPERINGS", "BENIGN", "apply_change", "weights_restored", "evaluate_integrity",
           "DEFAULT_CHANGES", "locate_components", "mean_difference"]
