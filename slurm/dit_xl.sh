#!/bin/bash
# The DiT-XL/2 recipe (configs/diffusion/dit_xl2.yaml) on Slurm:  sbatch slurm/dit_xl.sh [key=value ...]
#
#   sbatch slurm/dit_xl.sh data.dir=/fs/imagenet256_wds model.vae=/fs/vae/sd-vae-ft-ema
#   sbatch --nodes=4 slurm/dit_xl.sh data.dir=... model.vae=... train.steps=7000000
#
# Cluster assumptions: nodes with 8 NVIDIA GPUs each (--gpus-per-node=8, one task per GPU),
# bigtrain installed with its diffusers extra (pip install 'bigtrain[diffusers]') in the Python that
# `python3` (or $BIGTRAIN_PYTHON) names on the compute nodes, the repository, data.dir, model.vae (a
# local diffusers AutoencoderKL directory: nothing is downloaded) and run.dir on a shared filesystem,
# node names from `scontrol show hostnames` reachable from every node, and jobs allowed to requeue
# themselves (JobRequeue=1, the default). Set the partition/account on the sbatch line (-p, -A).
#
# 16 GPUs x 16 images = the recipe's global batch of 256 (bigtrain splits it over the data-parallel
# ranks; more nodes keep the batch and shrink each rank's share). One Slurm task per training
# process, so the --signal below reaches every rank: bigtrain finishes its step, saves (model,
# optimizer and the sharded EMA), exits 75, and launch.slurm_job requeues the job (up to
# BIGTRAIN_MAX_REQUEUES=20 times). Details and a local test cluster: slurm/README.md.
#SBATCH --job-name=bigtrain-dit-xl
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=USR2@300
#SBATCH --output=slurm-%x-%j.out
exec "${BIGTRAIN_PYTHON:-python3}" -m launch.slurm_job configs/diffusion/dit_xl2.yaml "$@"
