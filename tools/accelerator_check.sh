#!/usr/bin/env bash
# One-shot accelerator check: GPU/CPU parity tests and benchmark figures, one JSON line each.
#
# usage (repository root, fresh GPU or TPU machine):
#   [OUT=DIR] [PYTHON=python3] [ACCEL_CHECK_DEADLINE=480] [ACCEL_CHECK_QUICK=1] \
#     bash tools/accelerator_check.sh [RESULTS.jsonl]
#
# Results: RESULTS.jsonl (default $OUT/accelerator_check.jsonl when OUT is set, else
# ./accelerator_check.jsonl), the raw output of every step beside it (RESULTS.log).
# Every line carries "step"; a step that fails or runs out of time adds
# {"step": ..., "error": ...} and the script goes on with the next one.
#
# Steps: install (only where a wheel folder exists: ACCEL_CHECK_WHEELS, default .whl; installs
# the wheels whose distribution is missing, and upgrades those named in ACCEL_CHECK_UPGRADE,
# default orbax-checkpoint; --no-deps --no-index; ACCEL_CHECK_INSTALL=0 skips it),
# env (versions, devices), gpu_tests (tests/test_gpu.py under JAX_PLATFORMS=<platform>,cpu),
# compile, train (bf16 compute) and forward (float32 B=1,16,32; model.dtype=bfloat16 B=1,32)
# benchmarks of configs/refcoco.py at batch 16. ACCEL_CHECK_QUICK=1: the CI-sized config
# (configs/magnet.py:tiny) at batch 2 instead, for a dry run on any machine, CPU included.
#
# The whole run ends within ACCEL_CHECK_DEADLINE seconds (default 480): each step runs under
# `timeout` with the smaller of its own cap and the time left; steps that would start with
# under ACCEL_CHECK_MIN_STEP seconds (default 20) left are recorded as skipped.
# Benchmarks run with the persistent compilation cache off (MAGNET_JAX_CACHE_DIR=off, no
# JAX_COMPILATION_CACHE_DIR), so compile times are real compiles.

set -u

PYTHON=${PYTHON:-python3}
DEADLINE=${ACCEL_CHECK_DEADLINE:-480}
MIN_STEP=${ACCEL_CHECK_MIN_STEP:-20}
QUICK=${ACCEL_CHECK_QUICK:-0}
WHEELS=${ACCEL_CHECK_WHEELS:-.whl}
UPGRADE=${ACCEL_CHECK_UPGRADE:-orbax-checkpoint}
if [[ $# -ge 1 ]]; then
  RESULTS=$1
elif [[ -n "${OUT:-}" ]]; then
  RESULTS=$OUT/accelerator_check.jsonl
else
  RESULTS=accelerator_check.jsonl
fi
LOG=${RESULTS%.jsonl}.log
[[ "$LOG" == "$RESULTS" ]] && LOG=$RESULTS.log
mkdir -p "$(dirname "$RESULTS")"
: > "$RESULTS"
: > "$LOG"
START=$SECONDS
WORK=$(mktemp -d "${TMPDIR:-/tmp}/accel_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# Collects a step's output into RESULTS: JSON lines (lines that parse as JSON objects), the
# `GPU_PARITY {json}` lines of tests/test_gpu.py, pytest's summary counts, and an error record
# when the step failed.
cat > "$WORK/collect.py" <<'EOF'
import json, re, sys
step, rc, out_path, results, elapsed = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], float(sys.argv[5])
extra = json.loads(sys.argv[6]) if len(sys.argv) > 6 and sys.argv[6] else {}
text = open(out_path, errors="replace").read()
records = []
for line in text.splitlines():
    line = line.strip()
    body = line[len("GPU_PARITY "):] if line.startswith("GPU_PARITY ") else line
    if body.startswith("{") and body.endswith("}"):
        try:
            obj = json.loads(body)
        except ValueError:
            continue
        if isinstance(obj, dict):
            records.append({"step": step, **extra, **obj})
if step == "gpu_tests":
    counts = {k: 0 for k in ("passed", "failed", "skipped", "error", "xfailed", "xpassed")}
    summary = [l for l in text.splitlines() if re.search(r"\d+ (passed|failed|skipped|errors?)\b", l)]
    if summary:
        for n, what in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)", summary[-1]):
            counts["error" if what.startswith("error") else what] += int(n)
    failed = [l.split(" - ")[0][len("FAILED "):] for l in text.splitlines() if l.startswith("FAILED ")]
    records.append(dict({"step": step, "what": "pytest_summary", "rc": rc}, **counts,
                        failed_tests=failed, summary=summary[-1].strip("= ") if summary else None,
                        wall_s=round(elapsed, 1)))
elif rc != 0:
    tail = [l for l in text.splitlines() if l.strip()][-15:]
    reason = "timeout" if rc in (124, 137) else f"exit status {rc}"
    records.append({"step": step, **extra, "error": reason, "rc": rc,
                    "wall_s": round(elapsed, 1), "tail": "\n".join(tail)[-3000:]})
with open(results, "a") as f:
    for r in records:
        f.write(json.dumps(r) + "\n")
EOF

record() {  # record STEP ERROR [EXTRA_JSON]
  "$PYTHON" - "$1" "$2" "${3:-}" >> "$RESULTS" <<'EOF'
import json, sys
print(json.dumps({"step": sys.argv[1], **(json.loads(sys.argv[3]) if sys.argv[3] else {}),
                  "error": sys.argv[2]}))
EOF
}

# run_step NAME CAP_S EXTRA_JSON CMD...: runs CMD under timeout, logs it, collects its lines.
run_step() {
  local name=$1 cap=$2 extra=$3
  shift 3
  local left=$(( DEADLINE - (SECONDS - START) - 10 ))
  if (( left < MIN_STEP )); then
    echo "=== $name: skipped, ${left}s left of the ${DEADLINE}s deadline" >> "$LOG"
    record "$name" "skipped: deadline (${left}s left)" "$extra"
    return
  fi
  local limit=$(( cap < left ? cap : left ))
  echo "=== $name (limit ${limit}s, t=$(( SECONDS - START ))s): $*" >> "$LOG"
  local t0=$SECONDS
  timeout -k 5 "$limit" "$@" > "$WORK/out" 2>&1
  local rc=$?
  cat "$WORK/out" >> "$LOG"
  echo "=== $name: rc=$rc in $(( SECONDS - t0 ))s" >> "$LOG"
  "$PYTHON" "$WORK/collect.py" "$name" "$rc" "$WORK/out" "$RESULTS" "$(( SECONDS - t0 ))" "$extra" \
    || record "$name" "could not collect the output (rc=$rc)" "$extra"
}

# --- install: wheels carried along for a machine without internet ---------------------------
if [[ -d "$WHEELS" && "${ACCEL_CHECK_INSTALL:-1}" != 0 ]] && compgen -G "$WHEELS/*.whl" > /dev/null; then
  cat > "$WORK/install.py" <<'EOF'
import glob, importlib.metadata as md, json, os, re, subprocess, sys
wheels, upgrade = sys.argv[1], {re.sub(r"[-_.]+", "-", n).lower() for n in sys.argv[2].split(",") if n}
def version_key(v):
    return tuple(int(x) if x.isdigit() else 0 for x in re.split(r"[.+-]", v))
todo, kept = [], {}
for path in sorted(glob.glob(os.path.join(wheels, "*.whl"))):
    name, version = os.path.basename(path).split("-")[:2]
    key = re.sub(r"[-_.]+", "-", name).lower()
    try:
        have = md.version(key)
    except md.PackageNotFoundError:
        have = None
    if have is None or (key in upgrade and version_key(have) < version_key(version)):
        todo.append(path)
    else:
        kept[key] = have
print(json.dumps({"what": "install_plan", "install": [os.path.basename(p) for p in todo],
                  "already_installed": kept}), flush=True)
if todo:
    base = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index",
            "--disable-pip-version-check", "-q"]
    rc = subprocess.call(base + todo)
    if rc != 0:   # an externally managed or read-only interpreter
        rc = subprocess.call(base + ["--user", "--break-system-packages"] + todo)
    print(json.dumps({"what": "install_result", "rc": rc}), flush=True)
    sys.exit(rc)
EOF
  run_step install 120 "" "$PYTHON" "$WORK/install.py" "$WHEELS" "$UPGRADE"
fi

# --- a. environment --------------------------------------------------------------------------
cat > "$WORK/env.py" <<'EOF'
import importlib.metadata as md, json, os, platform, sys
import jax, jaxlib
devices = jax.devices()
d = devices[0]
platforms = d.platform
if d.platform == "gpu":
    platforms = "rocm" if "rocm" in str(getattr(d.client, "platform_version", "")).lower() else "cuda"
def ver(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
print(json.dumps({
    "what": "env", "python": platform.python_version(), "jax": jax.__version__,
    "jaxlib": jaxlib.__version__,
    **{n: ver(n) for n in ("flax", "optax", "orbax-checkpoint", "grain", "ml-collections",
                           "numpy", "jax-cuda13-plugin", "jax-cuda12-plugin", "libtpu")},
    "backend": jax.default_backend(), "jax_platforms_for_tests": platforms,
    "devices": [str(x) for x in devices], "device_count": len(devices),
    "device_kind": getattr(d, "device_kind", d.platform),
    "platform_version": str(getattr(d.client, "platform_version", "")),
    "memory_gb": round(d.memory_stats()["bytes_limit"] / 2**30, 1)
                 if d.platform != "cpu" and d.memory_stats() else None,
    "cpus": os.cpu_count(), "machine": platform.machine(), "env_JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS"),
}))
EOF
run_step env 90 "" "$PYTHON" "$WORK/env.py"
TEST_PLATFORMS=$("$PYTHON" -c 'import json,sys
for l in open(sys.argv[1]):
    r = json.loads(l)
    if r.get("what") == "env": print(r["jax_platforms_for_tests"])' "$RESULTS" 2>/dev/null | tail -1)

# --- b. GPU parity tests ---------------------------------------------------------------------
# tests/conftest.py sets JAX_PLATFORMS=cpu unless given; JAX_PLATFORMS=cuda alone would hide the
# CPU backend the tests compare with, hence "<platform>,cpu". pyproject's addopts (-n 2) need
# pytest-xdist: replaced here.
if [[ -z "$TEST_PLATFORMS" || "$TEST_PLATFORMS" == cpu ]]; then
  TEST_ENV=(JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}")
else
  TEST_ENV=(JAX_PLATFORMS="$TEST_PLATFORMS,cpu")
fi
run_step gpu_tests 240 "" env "${TEST_ENV[@]}" "$PYTHON" -m pytest -o addopts= -p no:xdist \
  -p no:cacheprovider -m gpu -q -s -rfE tests/test_gpu.py

# --- c, d, e. benchmarks ---------------------------------------------------------------------
BENCH_ENV=(env -u JAX_COMPILATION_CACHE_DIR MAGNET_JAX_CACHE_DIR=off)
if [[ "$QUICK" == 1 ]]; then
  CONFIG=configs/magnet.py:tiny; BATCH=2; TRAIN_ITERS=2; FWD_ITERS=3
  FWD_F32=(1 2); FWD_BF16=(2)
else
  CONFIG=configs/refcoco.py; BATCH=16; TRAIN_ITERS=5; FWD_ITERS=10
  FWD_F32=(1 16 32); FWD_BF16=(1 32)
fi
run_step compile 180 "" "${BENCH_ENV[@]}" "$PYTHON" -m magnet_jax.bench compile --config "$CONFIG" \
  --batch-size "$BATCH" --config.train.compute_dtype=bfloat16
run_step train 180 "" "${BENCH_ENV[@]}" "$PYTHON" -m magnet_jax.bench train --config "$CONFIG" \
  --batch-size "$BATCH" --iters "$TRAIN_ITERS" --config.train.compute_dtype=bfloat16
for b in "${FWD_F32[@]}"; do
  run_step forward 120 "{\"model_dtype\": \"float32\", \"batch_size\": $b}" "${BENCH_ENV[@]}" \
    "$PYTHON" -m magnet_jax.bench forward --config "$CONFIG" --batch-size "$b" --iters "$FWD_ITERS"
done
for b in "${FWD_BF16[@]}"; do
  run_step forward 120 "{\"model_dtype\": \"bfloat16\", \"batch_size\": $b}" "${BENCH_ENV[@]}" \
    "$PYTHON" -m magnet_jax.bench forward --config "$CONFIG" --batch-size "$b" --iters "$FWD_ITERS" \
    --config.model.dtype=bfloat16
done

echo "=== done in $(( SECONDS - START ))s" >> "$LOG"
echo "accelerator check: $(wc -l < "$RESULTS") records in $RESULTS (log: $LOG, $(( SECONDS - START ))s)"
