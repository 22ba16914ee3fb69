"""Data pipeline: webdataset shard writing and deterministic, resumable loading.

This package never imports ``bigtrain``; the trainer depends on it, not the reverse.
"""

from data_pipeline.index import DataError, SplitInfo, load_split
from data_pipeline.loader import ImageBatchDataset, ImageSpec, NoisedImageDataset, TrainStream, sequential_batches
from data_pipeline.order import GlobalOrder

__all__ = [
    "DataError",
    "GlobalOrder",
    "ImageBatchDataset",
    "ImageSpec",
    "NoisedImageDataset",
    "SplitInfo",
    "TrainStream",
    "load_split",
    "sequential_batches",
]
