"""Training components: state beyond the model and its optimizer (EMA weights, a frozen teacher,
a data-pruning score table) that plugs into the trainer without the trainer knowing what it is."""

from bigtrain.components.base import TrainComponent
from bigtrain.components.ema import EMA

__all__ = ["EMA", "TrainComponent"]
