#!/bin/bash
# The whole comparison on a SLURM cluster: `sbatch slurm/compare.sh [--config PATH] [key=value ...]`
# from the repository root (or `bash slurm/compare.sh ...` on a login node). It submits
#   - for the smoke preset only: a job that pre-trains the stand-in weights,
#   - a job array, one element per regime (pretrained, scratch, frozen), each
#     slurm/train.sbatch with its own folder under the comparison folder,
#   - a report job that runs when the array has ended, however it ended, and writes
#     report.md from whatever finished,
# and prints their job ids and where the report will be. Arguments are fmdist-compare's:
# --config (default configs/base.yaml), --output-dir (default runs/compare-<config name>),
# and overrides that apply to every regime. Rerunning resumes what is unfinished.
#
# Environment variables:
#   FMDIST_TRAIN_SBATCH_ARGS  sbatch flags for the training jobs, e.g. "--nodes=2 --gpus-per-node=4 --time=4:00:00"
#   FMDIST_PYTHON             Python with fmdist installed (default: .venv/bin/python if present, else python)
#   SBATCH_PARTITION, SBATCH_ACCOUNT, ...: sbatch's own variables apply to every job submitted.
# Submitted with sbatch, the jobs it submits inherit its partition, account and QOS
# (`sbatch -p gpu -A proj slurm/compare.sh` puts all of them on gpu, charged to proj).
#
#SBATCH --job-name=fmdist-compare
#SBATCH --ntasks=1
#SBATCH --time=00:10:00
#SBATCH --output=fmdist-compare-%j.out
set -euo pipefail

fail() { echo "fmdist-compare: error: $*" >&2; exit 2; }

# sbatch runs a copy of this script from its spool folder; the templates stay where it was submitted.
if [ -n "${SLURM_JOB_ID:-}" ]; then slurm_dir=$SLURM_SUBMIT_DIR/slurm; else slurm_dir=$(dirname "$0"); fi
slurm_dir=${FMDIST_SLURM_DIR:-$slurm_dir}
[ -f "$slurm_dir/train.sbatch" ] || fail "no train.sbatch in $slurm_dir: submit from the repository root"
if [ -z "${FMDIST_PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then FMDIST_PYTHON=$PWD/.venv/bin/python; else FMDIST_PYTHON=python; fi
fi
export FMDIST_PYTHON

args=("$@")
case " ${args[*]} " in *" --config "* | *" --config="*) ;; *) args=(--config configs/base.yaml "${args[@]}") ;; esac
planned=$("$FMDIST_PYTHON" -m fmdist.compare --plan "${args[@]}") || exit $?
plan=$(sed -n 's/^fmdist-compare: plan written to \(.*\) (regimes: .*)$/\1/p' <<<"$planned")
regimes=$(sed -n 's/^fmdist-compare: plan written to .* (regimes: \(.*\))$/\1/p' <<<"$planned")
[ -d "$plan" ] || fail "fmdist-compare --plan did not say where it wrote the plan: $planned"
out=$(dirname "$plan")

# The jobs it submits go to this job's partition, account and QOS unless SBATCH_* variables or
# the flags in FMDIST_TRAIN_SBATCH_ARGS say otherwise.
if [ -n "${SLURM_JOB_PARTITION:-}" ]; then export SBATCH_PARTITION=${SBATCH_PARTITION:-$SLURM_JOB_PARTITION}; fi
if [ -n "${SLURM_JOB_ACCOUNT:-}" ]; then export SBATCH_ACCOUNT=${SBATCH_ACCOUNT:-$SLURM_JOB_ACCOUNT}; fi
if [ -n "${SLURM_JOB_QOS:-}" ]; then export SBATCH_QOS=${SBATCH_QOS:-$SLURM_JOB_QOS}; fi
# This job's own SLURM_* variables must not leak into the jobs it submits (their srun would
# inherit its task layout); SLURM_CONF says where the cluster is and stays.
for name in $(compgen -e | grep '^SLURM_' | grep -vx SLURM_CONF); do unset "$name"; done

read -ra train_flags <<<"${FMDIST_TRAIN_SBATCH_ARGS:-}"
submit() { sbatch --parsable "$@" | cut -d ';' -f 1; }

after_stand_in=()
if [ -s "$plan/stand-in.plan" ]; then
    stand_in=$(FMDIST_PLAN=$plan/stand-in.plan submit "${train_flags[@]}" --job-name=fmdist-stand-in \
        --output="$out/slurm-%x-%j.out" "$slurm_dir/train.sbatch")
    after_stand_in=(--dependency="afterok:$stand_in" --kill-on-invalid-dep=yes)
    echo "fmdist-compare: stand-in pre-training: job $stand_in"
fi
count=$(wc -l <"$plan/regimes.plan")
array=$(FMDIST_PLAN=$plan/regimes.plan submit "${train_flags[@]}" "${after_stand_in[@]}" --array="0-$((count - 1))" \
    --job-name=fmdist-regime --output="$out/slurm-%x-%A_%a.out" "$slurm_dir/train.sbatch")
echo "fmdist-compare: regimes ($regimes): job array $array (elements 0-$((count - 1)) in that order)"
report=$(FMDIST_REPORT_PLAN=$plan/report.plan submit --dependency="afterany:$array" --kill-on-invalid-dep=no \
    --job-name=fmdist-report --output="$out/slurm-%x-%j.out" "$slurm_dir/report.sbatch")
echo "fmdist-compare: report: job $report, writes $out/report.md when the regimes have ended"
