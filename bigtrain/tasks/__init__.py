"""Training objectives: modules that own a model and return ``{"loss": ..., **logs}``."""

from bigtrain.tasks.classification import ClassificationTask

__all__ = ["ClassificationTask"]
