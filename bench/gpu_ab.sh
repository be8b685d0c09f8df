#!/bin/bash
# A/B of another tree against this checkout in one device call: the GPU's speed moves between
# calls (cuBLAS's same product read 0.500-0.549 ms across one session's H200 calls), so a change
# is only measured against the tree before it in the same call, alternating.
#
#   bash bench/gpu_ab.sh prepare REF            here: REF's tracked files into .gpu/ab/ (ignored;
#                                               add "/.gpu/" to .git/info/exclude once)
#   bash bench/gpu_ab.sh run [STEP ...]         on the device (carry ".gpu" and ".whl"), steps:
#       tests        REF's GPU tests (not the timing ones), 8 workers
#       timing       REF's timing-marked GPU tests (the CUDA graph ones), alone
#       suite:CASES  bench/suite.py --cases CASES (comma-separated), REF then this tree
#       profile:CASES  bench/gpu_kernel_profile.py CASES, REF, this tree, REF again
# Logs go to $OUT (or /tmp/kiln-gpu-ab); each tree has a Triton/kiln cache of its own.
set -u
B=.gpu/ab
if [ "${1:-}" = prepare ]; then
    rm -rf "$B" && mkdir -p "$B" && git archive "${2:?REF}" | tar -x -C "$B" && echo "$2 -> $B"
    exit $?
fi
[ "${1:-}" = run ] && shift
OUT=${OUT:-/tmp/kiln-gpu-ab}
mkdir -p "$OUT"
[ -d "$B" ] || { echo "no $B: run 'bash bench/gpu_ab.sh prepare REF' first and carry .gpu"; exit 2; }
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONUNBUFFERED=1
HERE=$PWD
t() {       # name, seconds, dir, command...
    local name=$1 secs=$2 dir=$3 s=$SECONDS; shift 3
    (cd "$dir" && PYTHONPATH=/tmp/site:$PWD KILN_CACHE_DIR=/tmp/kc_ab_$name timeout "$secs" "$@") > "$OUT/$name.log" 2>&1
    echo "== $name: rc $? in $((SECONDS - s)) s"
    grep -v "DEBUG\|Warning\|warn(" "$OUT/$name.log" | grep "${PAT:-.}" | tail -"${TAIL:-20}"
}
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(tests timing suite:llama_layer profile:llama_layer)
for step in "${steps[@]}"; do   # all checked before any runs: device time is scarce
    case $step in
        tests|timing|suite:?*|profile:?*) ;;
        *) echo "unknown step $step (tests, timing, suite:CASES, profile:CASES)"; exit 2 ;;
    esac
done
for step in "${steps[@]}"; do
    case $step in
        tests) TAIL=6 t tests_B 240 "$B" python3 -m pytest -m "gpu and not timing" tests -rf -n 8 -q -p no:cacheprovider ;;
        timing) TAIL=6 t timing_B 150 "$B" python3 -m pytest -m "gpu and timing" tests -rf -q -p no:cacheprovider ;;
        suite:*) c=${step#suite:}; c=${c//,/ }
                 PAT=" ms" t suite_B 200 "$B" python3 bench/suite.py --cases $c --json "$OUT/suite_B.json"
                 PAT=" ms" t suite_A 200 "$HERE" python3 bench/suite.py --cases $c --json "$OUT/suite_A.json" ;;
        profile:*) c=${step#profile:}; c=${c//,/ }
                   for run in B1:$B A:$HERE B2:$B; do
                       PAT="kiln:\|inductor:\|^##" t "profile_${run%%:*}" 120 "${run#*:}" python3 bench/gpu_kernel_profile.py $c
                   done ;;
        *) echo "unknown step $step"; exit 2 ;;
    esac
done
