#!/bin/bash
# The ViT-G/14 recipe (configs/vit/vit_g14.yaml) on Slurm:  sbatch slurm/vit_g.sh [key=value ...]
#
#   sbatch slurm/vit_g.sh                                   # 8 nodes x 8 GPUs, ZeRO-3 over 64 ranks
#   sbatch --nodes=2 slurm/vit_g.sh data.dir=/fs/imagenet21k_wds train.steps=1000
#
# Cluster assumptions: nodes with 8 NVIDIA GPUs each (--gpus-per-node=8, one task per GPU),
# bigtrain installed in the Python that `python3` (or $BIGTRAIN_PYTHON) names on the compute
# nodes, the repository, data.dir and run.dir on a shared filesystem, node names from
# `scontrol show hostnames` reachable from every node, and jobs allowed to requeue themselves
# (JobRequeue=1, the default). Set the partition/account on the sbatch line (-p, -A).
#
# One Slurm task per training process (no torchrun agent), so the --signal below reaches every
# rank: bigtrain finishes its step, saves, exits 75, and launch.slurm_job requeues the job (up
# to BIGTRAIN_MAX_REQUEUES=20 times); it also stops itself before the job's end time. Details,
# environment knobs and a local test cluster: slurm/README.md.
#SBATCH --job-name=bigtrain-vit-g
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=USR2@300
#SBATCH --output=slurm-%x-%j.out
exec "${BIGTRAIN_PYTHON:-python3}" -m launch.slurm_job configs/vit/vit_g14.yaml "$@"
