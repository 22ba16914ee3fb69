#!/bin/bash
# Minitron on Slurm: prune a teacher, then distill the pruned student from it.
#
#   sbatch slurm/minitron.sh TEACHER PRUNED "PRUNE ARGS" CONFIG [key=value ...]
#
#   sbatch slurm/minitron.sh runs/teacher/checkpoints/step_00000900 runs/pruned "--hidden 144 --ffn 320" \
#       configs/llm/minitron_student.yaml run.dir=runs/student
#   BIGTRAIN_LOGITS=runs/teacher_top16 sbatch --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 slurm/minitron.sh ...
#
# TEACHER: a Hugging Face directory or a bigtrain checkpoint of the llama family. PRUNED: where the
# pruned student (an HF directory, with prune_report.json) goes. CONFIG: the student's training config;
# this script adds model.pretrained=PRUNED, task=distill and the teacher section.
#
# Resumable at each stage: after a requeue (preemption, time limit) the script starts from the top
# and skips what is complete.
#   1. prune (one task): skipped when PRUNED/prune_report.json exists. bigtrain prune builds PRUNED
#      under a temporary name and renames it when done, so a half-written student is never trained;
#      an existing PRUNED that is not a complete prune output is refused (exit 2), never nested into.
#   2. with BIGTRAIN_LOGITS=DIR: the teacher's top-k logits stored once (all tasks,
#      `bigtrain distill-logits`, top-k from BIGTRAIN_TOP_K, default 16); skipped when DIR/logits.json
#      exists. The student then reads them instead of running the teacher.
#   3. distillation: launch.slurm_job, one task per rank, resume=auto and requeue as for slurm/llm.sh.
#
# Cluster assumptions as for slurm/llm.sh (bigtrain installed for `python3` or $BIGTRAIN_PYTHON on
# the compute nodes, a shared filesystem, JobRequeue allowed). Details: slurm/README.md.
#SBATCH --job-name=bigtrain-minitron
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=4
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=USR2@120
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail
if [ $# -lt 4 ]; then
    echo "usage: sbatch slurm/minitron.sh TEACHER PRUNED \"PRUNE ARGS\" CONFIG [key=value ...]" >&2
    exit 2
fi
teacher=$1 pruned=$2 prune_args=$3 config=$4
shift 4
py=${BIGTRAIN_PYTHON:-python3}
say() { echo "[bigtrain minitron $(date +%H:%M:%S)] $*"; }

if [ -f "$pruned/prune_report.json" ]; then
    say "stage 1 (prune): $pruned is complete, skipped"
else
    say "stage 1 (prune): $teacher -> $pruned ($prune_args)"
    # shellcheck disable=SC2086  # the prune arguments are meant to split
    srun --nodes=1 --ntasks=1 --kill-on-bad-exit=1 "$py" -m bigtrain prune "$teacher" --out "$pruned" $prune_args
fi

student=("model.pretrained=$pruned" "task=distill" "teacher.family=llama" "teacher.pretrained=$teacher" "$@")
if [ -n "${BIGTRAIN_LOGITS:-}" ]; then
    if [ -f "$BIGTRAIN_LOGITS/logits.json" ]; then
        say "stage 2 (teacher logits): $BIGTRAIN_LOGITS is complete, skipped"
    else
        say "stage 2 (teacher logits): top-${BIGTRAIN_TOP_K:-16} into $BIGTRAIN_LOGITS"
        srun --kill-on-bad-exit=1 "$py" -m bigtrain distill-logits "$config" "${student[@]}" \
            --out "$BIGTRAIN_LOGITS" --top-k "${BIGTRAIN_TOP_K:-16}"
    fi
    student+=("distill.logits=$BIGTRAIN_LOGITS")
fi

say "stage 3 (distillation): $config ${student[*]}"
exec "$py" -m launch.slurm_job "$config" "${student[@]}"
