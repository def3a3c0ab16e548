"""Runtime safety monitoring built from the located refusal components.

- :mod:`.request`: flag harmful requests from activations before generation.
"""

from .request import RequestCheck, RequestMonitor, detection_metrics, fit_request_monitor

__all__ = ["RequestMonitor", "RequestCheck", "fit_request_monitor", "detection_metrics"]
