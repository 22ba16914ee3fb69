#!/bin/bash
# Train any causal-LM config on Slurm:  sbatch [sbatch options] slurm/llm.sh CONFIG [key=value ...]
#
#   sbatch slurm/llm.sh configs/llm/stdlib_test.yaml train.steps=200
#   sbatch --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 slurm/llm.sh CONFIG parallel.tp=8
#
# Cluster assumptions: bigtrain is installed (pip install -e .) in the Python that `python3` (or
# $BIGTRAIN_PYTHON) names on the compute nodes, the repository and run.dir are on a filesystem
# every node sees, nodes reach each other by the names `scontrol show hostnames` prints, and the
# job may requeue itself (JobRequeue=1, the default). No GPUs are requested here: CPU/gloo unless
# the sbatch line adds --gpus-per-node (then NCCL, one GPU per task: --ntasks-per-node = GPUs).
#
# One Slurm task per training process (no torchrun agent), so the --signal below reaches every
# rank: bigtrain finishes its step, saves, exits 75, and launch.slurm_job requeues the job (up
# to BIGTRAIN_MAX_REQUEUES=20 times); it also stops itself before the job's end time. Details,
# environment knobs and a local test cluster: slurm/README.md.
#SBATCH --job-name=bigtrain-llm
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=4
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=USR2@120
#SBATCH --output=slurm-%x-%j.out
exec "${BIGTRAIN_PYTHON:-python3}" -m launch.slurm_job "$@"
