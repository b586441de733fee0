#!/usr/bin/env bash
# The GPU suite in one call (for the lent H100/H200): environment, `bi-norm verify` on every
# backend, the GPU-marked tests, then the benchmark; a short table last. Logs go to $OUT if set.
# Usage: bash scripts/gpu_suite.sh [verify|tests|bench|tune|profile|probe|mosaic]...   (default: the first three)
#   tests runs three phases; tests-main (the many-worker phase) and tests-big (the bigmem and the
#   2**31-element ones) are the same phases split for two device calls of at most 10 minutes each;
#   tune: the backward's and the forward's launch sweeps (scripts/tune_backward.py, tune_launch.py);
#   profile: ncu of both kernels' forward and backward at 16384 x 4096 bf16; probe: the Mosaic GPU
#   probe (scripts/probes/probe_mosaic.py); mosaic: bi_jax's Mosaic GPU path alone, in about 4 minutes
#   (the loop over layers, the forward's probe, its GPU tests and in-place ones, verify's Mosaic row).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # torch and JAX share the GPU in one process
out="${OUT:-/tmp/bi-norm-gpu}"; mkdir -p "$out"
export BI_NORM_TEST_TIMES="${BI_NORM_TEST_TIMES:-$out/test-times}"  # each test's time as it ends (tests/conftest.py)
steps=("${@:-verify tests bench}"); steps=(${steps[*]})
py=python3
status=0
# Peers the GPU image lacks (Liger-Kernel) travel as wheels in .whl: name .whl in the call's carry.
if [ -d .whl ]; then
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site" || echo "wheel install from .whl failed; bench skips those peers"
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$py -c "import sys, torch, triton, jax; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'jax', jax.__version__, jax.devices())"

# pytest-xdist's worker count: one per $1 MB of free GPU memory, at most $2 (nothing without xdist).
free=$(nvidia-smi --query-gpu=memory.free --format=csv,noheader,nounits | head -n 1)
xdist() { $py -c "import xdist" 2>/dev/null && echo "-n $(( free / $1 > $2 ? $2 : (free / $1 < 1 ? 1 : free / $1) ))"; }
opts=(-p no:cacheprovider -v -rfE --tb=short --durations=20)

for step in "${steps[@]}"; do
  case "$step" in
    verify)
      $py -m bridge.cli verify 2>&1 | tee "$out/verify.txt" || status=1 ;;
    tests|tests-main|tests-big)
      # Several processes when pytest-xdist is there (compiles dominate a cold run): one per 6 GB of
      # free GPU memory, at most 12. The `bigmem` tests (tests/conftest.py) next: the wide sweeps on a
      # worker per 20 GB, then the ones over 2**31 elements (24-50 GB) one at a time, each in its own process.
      huge="2_31 or two_to_the_31"
      if [ "$step" != tests-big ]; then
        $py -m pytest -m "(gpu or codegen) and not bigmem" "${opts[@]}" $(xdist 6144 12) tests 2>&1 \
          | tee "$out/gpu-tests.txt" | tail -n 40 || status=1
      fi
      [ "$step" = tests-main ] && continue
      $py -m pytest -m "gpu and bigmem" -k "not ($huge)" "${opts[@]}" $(xdist 20480 4) tests 2>&1 \
        | tee "$out/gpu-tests-bigmem.txt" | tail -n 20 || status=1
      # One process each: memory a finished test's framework keeps pooled (JAX's allocator holds
      # what the 2**31 split test used) would leave the next one short of its 24-50 GB.
      : > "$out/gpu-tests-huge.txt"; passed=0; failed=0
      for id in $($py -m pytest -m "gpu and bigmem" -k "$huge" --collect-only -q -p no:cacheprovider tests | grep "::"); do
        if $py -m pytest "${opts[@]}" "$id" >> "$out/gpu-tests-huge.txt" 2>&1; then passed=$((passed + 1))
        else failed=$((failed + 1)); status=1; echo "FAILED $id"; fi
      done
      echo "huge tests, one process each: $passed passed, $failed failed" | tee -a "$out/gpu-tests-huge.txt" ;;
    bench)
      if [ -f bridge/bench/__init__.py ]; then
        $py -m bridge.cli bench --out "$out" 2>&1 | tee "$out/bench.txt" || status=1
      fi ;;
    tune)
      $py scripts/tune_backward.py --shapes 16384x4096,65536x4096,4096x8192,4096x16384,4096x65536 --rows 1,2,4 \
        --steps 4,8,16 --warps 8,16 2>&1 | tee "$out/tune-backward.txt" || status=1
      $py scripts/tune_backward.py --shapes 16384x4096,4096x8192 --residual --rows 1,2,4 --steps 8 --warps 16 \
        2>&1 | tee -a "$out/tune-backward.txt" || status=1
      $py scripts/tune_launch.py --jax 2>&1 | tee "$out/tune-launch.txt" || status=1 ;;
    profile)
      # The main kernels only, three calls each (probes/profile_shape.py): Triton's, then Pallas's.
      for pass in forward backward; do
        kernels="^(rms_norm_kernel|bi_norm_rms_norm)$"
        [ "$pass" = backward ] && kernels="^(rms_norm_backward_kernel|bi_norm_rms_norm_backward)$"
        ncu --clock-control none -k "regex:$kernels" -c 6 --section LaunchStats --section Occupancy \
          --section SpeedOfLight --section MemoryWorkloadAnalysis $py scripts/probes/profile_shape.py "$pass" 16384x4096 \
          > "$out/ncu-$pass-16384x4096.txt" 2>&1 || status=1
        grep -E "^  [a-z_]+ \(|Registers Per|Duration|DRAM Throughput|Achieved Occ|L1/TEX Hit|Shared Memory Config" \
          "$out/ncu-$pass-16384x4096.txt"
      done ;;
    probe)
      $py scripts/probes/probe_mosaic.py 2>&1 | tee "$out/probe-mosaic.txt" || status=1 ;;
    mosaic)
      $py scripts/probes/layer_loop.py 2>&1 | tee "$out/layer-loop.txt" || status=1
      $py scripts/probes/mosaic_forward.py --budget 60 2>&1 | tee "$out/mosaic-forward.txt" || status=1
      $py -m pytest -m "gpu and not bigmem" "${opts[@]}" $(xdist 6144 12) tests/test_jax_mosaic_gpu.py \
        tests/test_jax_mosaic_backward_gpu.py tests/test_jax_mosaic_fp8_gpu.py tests/test_jax_layer_stack.py \
        tests/test_jax_gpu.py::test_donated_residual tests/test_jax_gpu.py::test_residual_in_a_layer_loop_is_not_copied \
        tests/test_jax_backward_gpu.py::test_train_step_copies_no_array \
        tests/test_jax_backward_gpu.py::test_layer_loop_backward_copies_no_array 2>&1 \
        | tee "$out/gpu-tests.txt" | tail -n 25 || status=1
      $py -m bridge.cli verify --backend pallas-mosaic-gpu 2>&1 | tee "$out/verify.txt" || status=1 ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done

echo "==== summary ===="
[ -f "$out/verify.txt" ] && sed -n '/^backend /,$p' "$out/verify.txt"
[ -f "$out/gpu-tests.txt" ] && tail -n 3 "$out/gpu-tests.txt"
for f in gpu-tests-bigmem gpu-tests-huge; do [ -f "$out/$f.txt" ] && tail -n 1 "$out/$f.txt"; done
if [ -d "$BI_NORM_TEST_TIMES" ]; then
  echo "slowest tests (s), and the seconds per file:"; cat "$BI_NORM_TEST_TIMES"/*.tsv | sort -rn | head -n 15
  cat "$BI_NORM_TEST_TIMES"/*.tsv | awk -F'\t' '{split($3, p, "::"); t[p[1]] += $1} END {for (f in t) printf "%8.1f %s\n", t[f], f}' | sort -rn
fi
[ -f "$out/bench-table.txt" ] && cat "$out/bench-table.txt"
exit $status
