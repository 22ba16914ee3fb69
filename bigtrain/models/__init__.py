"""Models written for one device; parallelism is applied from outside (bigtrain.distributed)."""
