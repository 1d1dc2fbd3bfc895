#!/usr/bin/env bash
# The fault probes of issue 12, by hand, on the tiny digits test config (configs/digits.py:test):
# each row runs `python -m mmd_jax.main` the way a user's cluster would and records the exit code
# and the line that says what happened. Writes OUT/probes.md (the table in README, "Reliability")
# and one log per probe under OUT/logs.
#
#   bash experiments/fault_probes.sh [OUT]        # default OUT: /tmp/mmd_fault_probes
#
# CPU only, offline (the digits ship with scikit-learn); 20 minutes on 2 cores (40 when they are
# shared with other heavy jobs). Probes run
# one after another; every signal waits for its event (a checkpoint directory), not the clock.
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-/tmp/mmd_fault_probes}
rm -rf "$OUT" && mkdir -p "$OUT/logs"
DATA=$OUT/data
CFG="--config=$REPO/configs/digits.py:test"
export JAX_PLATFORMS=cpu MMD_JAX_CPU_DEFAULTS=0 PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
export JAX_COMPILATION_CACHE_DIR=$OUT/compile_cache  # the same tiny programs compile once
export XLA_FLAGS="--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0"
cd "$REPO" || exit 1
python -c "from mmd_jax.data import digits; digits.ensure_digits_prepared('$DATA')" || exit 1
TABLE=$OUT/probes.md
printf '| probe | observed now | exit |\n|---|---|---|\n' > "$TABLE"

mm() {  # mm WORKDIR FLAGS...: the command line on the tiny config, output on stdout
  local w=$1; shift
  python -m mmd_jax.main "$CFG" --mode=train --workdir="$w" --config.data.data_dir="$DATA" "$@" 2>&1
}

mm_bg() {  # mm for `mm_bg WORKDIR FLAGS... > LOG &`: exec, so that $! is python's pid
  local w=$1; shift
  exec python -m mmd_jax.main "$CFG" --mode=train --workdir="$w" --config.data.data_dir="$DATA" "$@" 2>&1
}

row() {  # row PROBE OBSERVED EXIT
  printf '| %s | %s | %s |\n' "$1" "$(echo "$2" | tr '|\n' '/ ' | sed 's/ *$//')" "$3" >> "$TABLE"
  printf '%-70.70s exit %s\n' "$1" "$3"
}

said() {  # said LOG PATTERN...: the first line of LOG matching the first pattern that matches
  local log=$1; shift
  for p in "$@"; do
    local l; l=$(grep -m1 -E -- "$p" "$log") && {
      # without absl's "I1130 01:02:03.456 123 file.py:45] " and this script's OUT/ prefix
      l=$(echo "$l" | sed -E 's/^[IWEF][0-9]{4} [0-9:.]+ +[0-9]+ [^]]+\] //; s#'"$OUT"'/##g')
      echo "${l:0:700}"; return; }
  done
  echo "(no line matching: $*)"
}

tb() { grep -q Traceback "$1" && echo " [TRACEBACK]"; }

yes_no() { [ -e "$1" ] && echo yes || echo no; }

steps_in() { ls "$1/checkpoints" 2>/dev/null | grep -E '^[0-9]+$' | sort -n | tr '\n' ' '; }

wait_ckpt() {  # wait_ckpt WORKDIR PID...: until a finished checkpoint exists (or a pid ends)
  local d=$1/checkpoints; shift
  until ls "$d" 2>/dev/null | grep -qE '^[0-9]+$'; do
    for p in "$@"; do kill -0 "$p" 2>/dev/null || return 1; done
    sleep 0.05
  done
}

run() {  # run LOG WORKDIR FLAGS...: mm with its output in OUT/logs/LOG.log; exit code in RC
  local log=$OUT/logs/$1.log; shift
  mm "$@" > "$log"; RC=$?
}

probe() {  # probe NAME LOG PATTERN... -- WORKDIR FLAGS...: run, then a row with the line
  local name=$1 log=$2; shift 2
  local pats=(); while [ "$1" != "--" ]; do pats+=("$1"); shift; done; shift
  run "$log" "$@"
  row "$name" "$(said "$OUT/logs/$log.log" "${pats[@]}")$(tb "$OUT/logs/$log.log")" "$RC"
}

free_port() {
  python -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])"
}

QUICK=(--config.eval.final= --config.eval.periodic=)

# ----- a finished tiny teacher (6 steps, checkpoints 3 and 6, final evaluation): the base -----
T=$OUT/teacher
run teacher "$T"
[ "$RC" = 0 ] || { echo "the base teacher failed:"; tail "$OUT/logs/teacher.log"; exit 1; }
copy() { rm -rf "${OUT:?}/$1"; cp -r "$T" "$OUT/$1"; echo "$OUT/$1"; }

# ----- SIGTERM to one of two --num_processes=2 workers (2 CPU devices each, FSDP over 4) -----
W=$OUT/two
port=$(free_port)
pids=()
for i in 0 1; do
  mm_bg "$W" --config.training.num_steps=100000 --config.training.checkpoint_every=5 \
    --config.training.log_every=5 --config.mesh.data=1 --config.mesh.fsdp=4 "${QUICK[@]}" \
    --coordinator_address="127.0.0.1:$port" --num_processes=2 --process_id=$i \
    --distributed_timeout_s=120 > "$OUT/logs/two_$i.log" &
  pids+=($!)
done
wait_ckpt "$W" "${pids[@]}"
kill -TERM "${pids[1]}"  # one process only
wait "${pids[0]}"; rc0=$?; wait "${pids[1]}"; rc1=$?
s0=$(grep -oE 'Preempted at step [0-9]+' "$OUT/logs/two_0.log")
s1=$(grep -oE 'Preempted at step [0-9]+' "$OUT/logs/two_1.log")
row "SIGTERM to one of two \`--num_processes=2\` workers" \
  "process 0: ${s0:-no preemption line}; process 1 (the one signalled): ${s1:-no preemption line}; checkpoints on disk: $(steps_in "$W")$(tb "$OUT/logs/two_0.log")$(tb "$OUT/logs/two_1.log")" \
  "$rc0 and $rc1"
probe "... resumed on one process with 2 devices (num_steps=$(( ${s0##* } + 5 )))" two_resume \
  'Resumed from' -- "$W" --config.training.num_steps=$(( ${s0##* } + 5 )) \
  --config.training.checkpoint_every=5 --config.training.log_every=5 --config.mesh.data=1 \
  --config.mesh.fsdp=2 "${QUICK[@]}"

# ----- SIGTERM during the pipeline's teacher stage, then the same command again -----
P=$OUT/pipe
PFLAGS=(--mode=pipeline --config.training.num_steps=300 --config.pipeline.students=alternating:2)
mm_bg "$P" "${PFLAGS[@]}" > "$OUT/logs/pipe_term.log" &
pid=$!
wait_ckpt "$P/teacher" "$pid"
kill -TERM "$pid"; wait "$pid"; rc=$?
row "SIGTERM during the pipeline's teacher stage" \
  "$(said "$OUT/logs/pipe_term.log" '^mmd_jax: ') students/ exists: $(yes_no "$P/students"); comparison.md exists: $(yes_no "$P/comparison.md")$(tb "$OUT/logs/pipe_term.log")" \
  "$rc"
run pipe_rerun "$P" "${PFLAGS[@]}"
rec=$(python -c "import json,glob; print(json.load(open(sorted(glob.glob('$P/students/*/checkpoints/*/config/metadata'))[-1]))['teacher_record']['step'])" 2>&1 | tail -1)
row "... the same pipeline command rerun" \
  "$(said "$OUT/logs/pipe_rerun.log" 'Resumed from .*teacher'); the student was distilled from teacher step $rec (of 300); comparison.md exists: $(yes_no "$P/comparison.md")$(tb "$OUT/logs/pipe_rerun.log")" \
  "$RC"

# ----- a preempted single-process run -----
S=$OUT/term
mm_bg "$S" --config.training.num_steps=100000 --config.training.checkpoint_every=5 \
  --config.training.log_every=5 "${QUICK[@]}" > "$OUT/logs/term.log" &
pid=$!
wait_ckpt "$S" "$pid"
kill -TERM "$pid"; wait "$pid"; rc=$?
row "a preempted run (SIGTERM, one process)" \
  "$(said "$OUT/logs/term.log" '^mmd_jax: preempted')$(tb "$OUT/logs/term.log")" "$rc"

# ----- distillation with learning_rate=1e38, checkpoint_every=1 -----
D=$OUT/explode
run explode "$D" --mode=distill --config.distill.teacher="$T" \
  --config.distill.optim.learning_rate=1e38 --config.training.checkpoint_every=1 \
  --config.training.log_every=1 --config.distill.num_steps=12 --config.eval.num_samples=0
cat > "$OUT/nonfinite_on_disk.py" <<'EOF'
import os, sys, numpy as np, orbax.checkpoint as ocp, jax
d = os.path.join(sys.argv[1], "checkpoints")
steps = sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []
bad, top = [], 0.0
for s in steps:
  tree = ocp.StandardCheckpointer().restore(os.path.join(d, str(s), "state"))
  for x in jax.tree_util.tree_leaves({k: tree[k] for k in ("params", "ema_params")}):
    x = np.asarray(x, np.float64)
    if not np.all(np.isfinite(x)):
      bad.append(s)
      break
    top = max(top, float(np.abs(x).max()))
print(f"On disk: steps {steps}, non-finite in {bad or 'none'}, largest abs(param) {top:.3g}")
EOF
row "distillation, \`distill.optim.learning_rate=1e38\`, \`checkpoint_every=1\`" \
  "$(said "$OUT/logs/explode.log" '^mmd_jax error') $(python "$OUT/nonfinite_on_disk.py" "$D" 2>&1 | tail -1)$(tb "$OUT/logs/explode.log")" \
  "$RC"

# ----- a finished run rerun with other evaluation settings; num_steps below the step reached -----
E=$(copy evalrerun)
probe "a finished run rerun with another \`eval.num_samples\`" num_samples \
  'Not reusing' 'Reusing' -- "$E" --config.eval.num_samples=24 --config.eval.batch_size=24
probe "... then with another \`eval.use_ema\`" use_ema \
  'Not reusing' 'Reusing' -- "$E" --config.eval.num_samples=24 --config.eval.batch_size=24 \
  --config.eval.use_ema=False
probe "... then with the same settings again" same \
  'Reusing' 'Not reusing' -- "$E" --config.eval.num_samples=24 --config.eval.batch_size=24 \
  --config.eval.use_ema=False
N=$(copy numsteps)
probe "the step-6 run rerun with \`training.num_steps=3\`" num_steps3 \
  'beyond the configured' -- "$N" --config.training.num_steps=3
row "... its final_eval.json afterwards" \
  "steps labelled: $(python -c "import json; print([r['step'] for r in json.load(open('$N/final_eval.json'))])" 2>&1 | tail -1)" "-"

# ----- truncated cache files -----
F=$(copy truncated)
python -c "p='$F/final_eval.json'; t=open(p).read(); open(p,'w').write(t[:len(t)//2])"
run final_eval_trunc "$F"
row "\`final_eval.json\` truncated" \
  "$(said "$OUT/logs/final_eval_trunc.log" 'final evaluation.*damaged') Evaluated again: $(grep -q 'eval final step' "$OUT/logs/final_eval_trunc.log" && echo yes || echo no); final_eval.json valid again: $(python -c "import json; json.load(open('$F/final_eval.json')); print('yes')" 2>/dev/null || echo no)$(tb "$OUT/logs/final_eval_trunc.log")" \
  "$RC"
V=$(copy evalmode)
EVAL=(--mode=eval --config.eval.num_samples=16 --config.eval.batch_size=8
      --config.eval.save_every=1 --config.eval.specs=ancestral:2
      --config.eval.reference_examples=200)
run evalmode "$V" "${EVAL[@]}"
spec=$(find "$V" -name spec.json | head -1)
if [ -n "$spec" ]; then
  python -c "p='$spec'; t=open(p).read(); open(p,'w').write(t[:25])"
  probe "the sharded evaluation's \`spec.json\` truncated (\`--mode=eval\`)" spec_trunc \
    'recomputing' 'spec.json' -- "$V" "${EVAL[@]}"
else
  row "the sharded evaluation's \`spec.json\` truncated (\`--mode=eval\`)" \
    "the first --mode=eval run wrote no spec.json (exit $RC)" "-"
fi

# ----- 64 bytes flipped in the largest file of checkpoints/6/state -----
B=$(copy flipped)
python - "$B/checkpoints/6/state" <<'EOF'
import os, sys
files = [os.path.join(r, f) for r, _, fs in os.walk(sys.argv[1]) for f in fs]
big = max(files, key=os.path.getsize)
n = os.path.getsize(big)
with open(big, "r+b") as f:
  f.seek(n // 2 - 32)
  data = f.read(64)
  f.seek(n // 2 - 32)
  f.write(bytes(b ^ 0xFF for b in data))
EOF
probe "64 bytes flipped in the largest file of \`checkpoints/6/state\`" flipped '^mmd_jax error' \
  -- "$B"

# ----- input validation -----
probe "\`eval.specs=ancestral:2:nan\` (\`--mode=eval\`)" spec_nan '^mmd_jax error' \
  -- "$(copy specnan)" "${EVAL[@]}" --config.eval.specs=ancestral:2:nan
probe "\`eval.specs=ancestral:2:-1\` (\`--mode=eval\`)" spec_neg '^mmd_jax error' \
  -- "$(copy specneg)" "${EVAL[@]}" --config.eval.specs=ancestral:2:-1
probe "\`eval.final=ancestral:2:nan\` (training)" final_nan '^mmd_jax error' \
  -- "$OUT/finalnan" --config.eval.final=ancestral:2:nan
probe "\`--num_processes=2\` with no peer, \`--distributed_timeout_s=10\`" nopeer \
  '^mmd_jax error' -- "$OUT/nopeer" --num_processes=2 --process_id=0 \
  --coordinator_address="127.0.0.1:$(free_port)" --distributed_timeout_s=10
probe "an unknown config key (\`--config.model.nonexistent=1\`)" unknown_key '^mmd_jax error' \
  -- "$OUT/unknown" --config.model.nonexistent=1
probe "a resume with another \`--config.seed\`" seed '^mmd_jax error' \
  -- "$(copy seed)" --config.training.num_steps=8 --config.seed=7
probe "\`distill.teacher=.../checkpoints/99\` (no such step)" teacher99 '^mmd_jax error' \
  -- "$OUT/student99" --mode=distill --config.distill.teacher="$T/checkpoints/99"

echo
cat "$TABLE"
