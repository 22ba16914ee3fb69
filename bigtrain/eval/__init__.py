"""Evaluators: callables ``evaluator(model) -> {metric_name: value}``."""

from bigtrain.eval.classification import ClassificationEvaluator
from bigtrain.eval.fewshot import fewshot_accuracy

__all__ = ["ClassificationEvaluator", "fewshot_accuracy"]
