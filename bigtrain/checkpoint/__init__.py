"""Sharded checkpoints users can trust: DCP with fixed keys, atomic commits, checksums,
verified loads with fallback, one timeline (see :mod:`bigtrain.checkpoint.manager`)."""

from bigtrain.checkpoint.integrity import (
    CONFIG_FILE,
    FORMAT_VERSION,
    MARKER,
    CheckpointError,
    CorruptCheckpoint,
    IncompatibleCheckpoint,
    SafeFileSystemReader,
    read_marker,
    read_metadata_file,
)
from bigtrain.checkpoint.manager import (
    Checkpointer,
    CheckpointSaveError,
    _single_process_ok,
    check_loadable,
    is_complete,
    list_complete,
    load_model_weights,
    open_saved_config,
    step_dir_name,
)
from bigtrain.checkpoint.state import ModelState, OptimizerState, RNGState, SafeLoadPlanner, ScalarState

__all__ = [
    "CONFIG_FILE", "FORMAT_VERSION", "MARKER", "CheckpointError", "CheckpointSaveError", "Checkpointer",
    "CorruptCheckpoint", "IncompatibleCheckpoint", "ModelState", "OptimizerState", "RNGState", "SafeFileSystemReader",
    "SafeLoadPlanner", "ScalarState", "_single_process_ok", "check_loadable", "is_complete", "list_complete",
    "load_model_weights", "open_saved_config", "read_marker", "read_metadata_file", "step_dir_name",
]
