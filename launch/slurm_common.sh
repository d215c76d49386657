# Sourced by the sbatch scripts in launch/: the job's remaining wall time for
# train.time_limit_minutes, and the requeue that continues a run which stopped to save.

# Seconds in squeue's duration field $1 of this job (%L: time left, %l: time limit); empty when the
# allocation has no limit.
job_seconds() {
  local left d=0 h=0 m=0 s=0
  left=$(squeue -h -j "$SLURM_JOB_ID" -o "$1")
  case "$left" in
    UNLIMITED|NOT_SET|INVALID|"") return ;;
    *-*) d=${left%%-*}; left=${left#*-} ;;
  esac
  IFS=: read -r -a parts <<< "$left"
  case ${#parts[@]} in
    3) h=${parts[0]}; m=${parts[1]}; s=${parts[2]} ;;
    2) m=${parts[0]}; s=${parts[1]} ;;
    1) s=${parts[0]} ;;
  esac
  echo $(( ((10#$d * 24 + 10#$h) * 60 + 10#$m) * 60 + 10#$s ))
}

# Minutes left in this allocation (to the hundredth), less a margin (FATHOM_MARGIN_MINUTES, default 10,
# fractions allowed): train.py saves and exits (code 75) before this budget runs out, so the job
# never dies mid-step. 0 (no limit) for an UNLIMITED allocation. A job whose time limit is shorter
# than twice the margin stops here (exit 2): it would save after a step or two, requeue, and do the
# same again forever. The limit, not the time left, is checked: a job is seconds into its limit here.
time_left_minutes() {
  local left limit
  left=$(job_seconds %L)
  if [ -z "$left" ]; then echo 0; return; fi
  limit=$(job_seconds %l)
  awk -v left="$left" -v limit="${limit:-$left}" -v margin="${FATHOM_MARGIN_MINUTES:-10}" 'BEGIN {
    if (limit / 60 < 2 * margin) {
      printf "error: this job has a time limit of %.1f minutes, less than twice FATHOM_MARGIN_MINUTES=%s: it would " \
             "save and requeue every few steps; give it more --time or a smaller FATHOM_MARGIN_MINUTES\n", limit / 60, margin > "/dev/stderr"
      exit 2
    }
    printf "%.2f\n", left / 60 - margin
  }'
}

# train.py creates $FATHOM_REQUEUE_FILE when it saved and stopped early (SIGTERM/SIGUSR1 or its
# time limit): put the job back in the queue; the next start resumes (train.resume=auto).
export FATHOM_REQUEUE_FILE="${SLURM_SUBMIT_DIR}/.fathom-requeue-${SLURM_JOB_ID}"
rm -f "$FATHOM_REQUEUE_FILE"
# files of this job removed however it ends: a cancelled job (SIGTERM to this shell) never reaches
# requeue_if_asked, and its requeue file would stay in the submit directory
FATHOM_CLEANUP=("$FATHOM_REQUEUE_FILE")
trap 'rm -f "${FATHOM_CLEANUP[@]}"' EXIT
trap 'exit 143' TERM
requeue_if_asked() {
  if [ -f "$FATHOM_REQUEUE_FILE" ]; then
    rm -f "$FATHOM_REQUEUE_FILE"
    echo "fathom: saved and stopped early; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  exit "$1"
}

# Ranks per node for the launchers that start their own (torchrun, deepspeed): one per GPU of the
# allocation. An allocation without GPUs has no such number, so it must be given, never guessed:
#   FATHOM_RANKS_PER_NODE=2 sbatch --gpus-per-node=0 launch/slurm_torchrun.sbatch ...
ranks_per_node() {
  if [ -n "${FATHOM_RANKS_PER_NODE:-}" ]; then
    echo "$FATHOM_RANKS_PER_NODE"
  elif [ "${SLURM_GPUS_ON_NODE:-0}" -gt 0 ]; then
    echo "$SLURM_GPUS_ON_NODE"
  else
    echo "error: this allocation has no GPUs: set FATHOM_RANKS_PER_NODE to the number of CPU ranks per node" \
         "(e.g. FATHOM_RANKS_PER_NODE=2 sbatch --gpus-per-node=0 ...)" >&2
    return 2
  fi
}
