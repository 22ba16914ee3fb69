"""Launchers (torchrun, Slurm, submitit) that start ``bigtrain`` processes.

Single-process training needs none of them: ``bigtrain train CONFIG``.
"""
