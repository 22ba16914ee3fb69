"""Training objectives: modules that own a model and return ``{"loss": ..., **logs}``."""

from bigtrain.tasks.causal_lm import CausalLMTask
from bigtrain.tasks.classification import ClassificationTask

__all__ = ["CausalLMTask", "ClassificationTask"]
