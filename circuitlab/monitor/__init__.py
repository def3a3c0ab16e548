"""Runtime safety monitoring built from the located refusal components.

- :mod:`.request`: flag harmful requests from activations before generation (``RequestMonitor``: a
  content probe or direction read-out at one layer).
- :mod:`.decision`: monitors that read the refusal decision (``FeatureMonitor``: refusal-direction projection
  at its layer and later ones, the first-token refusal log-odds, a multi-layer probe, a probe on circuit units).
- :mod:`.circuit`: circuit units (neurons, heads) as monitor features; ``read_units`` reads a circuit map's verified units.
- :mod:`.cascade`: ``UnionMonitor``, any member fires, members at ``alpha / m`` (Bonferroni).
- :mod:`.conformal`: split-conformal thresholds, ``P(false alarm) <= alpha`` for exchangeable benign traffic.
- :mod:`.saved`: a fitted monitor as a small file that refuses other weights; :mod:`.cli`: ``circuitlab monitor``.
- :mod:`.integrity`: detect tampering with the safety components (``IntegrityMonitor``).
- :mod:`.locate`: the components and direction the monitors watch.
- :class:`SafetyMonitor` bundles a request monitor and the integrity monitor.

The tamperings the integrity monitor is evaluated against live in ``circuitlab.defence.tampering`` (one of
them fine-tunes, so they sit above both this package and ``circuitlab.defence.finetune``).
"""

from circuitlab.monitor.cascade import UnionMonitor
from circuitlab.monitor.circuit import read_units
from circuitlab.monitor.conformal import conformal_threshold
from circuitlab.monitor.decision import FeatureMonitor, fit_feature_monitor, read_features
from circuitlab.monitor.integrity import IntegrityMonitor, IntegrityReport, count_foreign_hooks
from circuitlab.monitor.locate import locate_components
from circuitlab.monitor.request import RequestCheck, RequestMonitor, detection_metrics, fit_request_monitor
from circuitlab.monitor.safety import SafetyMonitor
from circuitlab.monitor.saved import load_monitor, save_monitor

__all__ = ["SafetyMonitor", "RequestMonitor", "RequestCheck", "fit_request_monitor", "detection_metrics",
           "FeatureMonitor", "fit_feature_monitor", "read_features", "read_units", "UnionMonitor", "conformal_threshold",
           "save_monitor", "load_monitor", "IntegrityMonitor", "IntegrityReport", "count_foreign_hooks",
           "locate_components"]
