"""circuitlab: find, verify, stress-test and monitor the components behind a model's refusal."""

from . import datasets, experiments, hooks, metrics
from .loading import load_model
from .model import HookedModel
from .results import Result
from .store import ActivationStore

__all__ = ["load_model", "HookedModel", "datasets", "hooks", "metrics", "experiments",
           "ActivationStore", "Result"]
__version__ = "0.1.0"
