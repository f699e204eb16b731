#!/usr/bin/env bash
# One GPU-machine session for the fused path: install the wheels the image lacks, run the GPU tests, the kernel
# floors and the training-step benchmark. Run from the repo root on the device machine:
#   bash benchmarks/gpu_session.sh STAGE...
# STAGEs, in the order given:
#   install-a    fla-core, flash-linear-attention, pydantic, ... (.gpu/core) + tilelang (.gpu/tla) into /tmp/site,
#                and the Triton autotune results + tilelang kernels of an earlier session (.gpu/cache), if any
#   install-b    z3-solver (.gpu/tlb), which tilelang needs (split off: the carry limit is 64 MiB per call)
#   tests        pytest -m gpu tests/test_ops_fused.py tests/test_model_gpu.py
#   kernels      benchmarks/kernels_bench.py (Comba and attention floors at B=150)
#   eager        crossdna bench train-step, eager, bf16 Comba (with a profile)
#   compiled     the same with torch.compile
#   faithful     eager with fp32 Comba (the upstream numerics)
#   faithful-compiled  fp32 Comba with torch.compile (not yet measured)
#   save-cache   the autotune results and tilelang kernels to $OUT/autotune_cache.tgz, for the next session
# Everything written under $OUT (logs, JSON) comes back; the chr20 FASTA is expected in .gpu/chr20/.
# With the `run` tool: call 1 carries .gpu/core .gpu/tla .gpu/cache and runs `install-a`; call 2, within the 30 s
# the machine stays warm, carries .gpu/tlb .gpu/chr20 and runs `install-b STAGE...`. Cold Triton autotuning and
# tilelang compilation take minutes; with .gpu/cache/autotune_cache.tgz from `save-cache` a bench warms up in ~1 min.
set -uo pipefail
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export CROSSDNA_CHR20_FASTA=$PWD/.gpu/chr20/20.fa.gz
OUT=${OUT:-/tmp/crossdna-out}
mkdir -p "$OUT"
LOG=$OUT/session.log
pip_install() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$@"; }
bench() { timeout "$1" python3 -m crossdna.cli bench train-step --fasta "$CROSSDNA_CHR20_FASTA" --out "$OUT" "${@:2}"; }
for stage in "$@"; do
  echo "=== $stage $(date -u +%T)" | tee -a "$LOG"
  case $stage in
    install-a) pip_install .gpu/core/*.whl .gpu/tla/*.whl 2>&1 | tail -3 | tee -a "$LOG"
               if [ -f .gpu/cache/autotune_cache.tgz ]; then tar xzf .gpu/cache/autotune_cache.tgz -C ~; fi ;;
    install-b) pip_install .gpu/tlb/*.whl 2>&1 | tail -3 | tee -a "$LOG"
               python3 -c "import torch, triton, fla, tilelang; from crossdna.ops import fused; print(torch.__version__, triton.__version__, fla.__version__, tilelang.__version__, torch.cuda.get_device_name(0), 'fused unavailable:', repr(fused.UNAVAILABLE))" 2>&1 | tail -3 | tee -a "$LOG" ;;
    tests) timeout 380 python3 -m pytest tests/test_ops_fused.py tests/test_model_gpu.py -m gpu -v -rs --tb=line -p no:logging --timeout 300 2>&1 | grep -E "PASS|FAIL|ERROR|SKIP|assert|Error|passed|failed" | tail -60 | tee -a "$LOG" ;;
    kernels) timeout 200 python3 benchmarks/kernels_bench.py "$OUT" 2>&1 | grep -v -i "warn\|tilelang" | tail -12 | tee -a "$LOG" ;;
    eager) bench 200 --comba-precision autocast --warmup 3 --steps 10 --profile 2 2>&1 | grep -v TileLang | tail -6 | tee -a "$LOG" ;;
    compiled) bench 330 --comba-precision autocast --compile --warmup 3 --steps 10 --profile 2 2>&1 | grep -v TileLang | tail -6 | tee -a "$LOG" ;;
    faithful) bench 200 --comba-precision fp32 --warmup 3 --steps 10 --profile 2 2>&1 | grep -v TileLang | tail -6 | tee -a "$LOG" ;;
    faithful-compiled) bench 330 --comba-precision fp32 --compile --warmup 3 --steps 10 --profile 2 2>&1 | grep -v TileLang | tail -6 | tee -a "$LOG" ;;
    save-cache) (cd ~ && find .triton/cache -name '*.autotune.json' > /tmp/autotune.list && tar czf "$OUT/autotune_cache.tgz" -T /tmp/autotune.list .tilelang) ;;
    *) echo "unknown stage $stage" | tee -a "$LOG"; exit 2 ;;
  esac
done
echo "=== done $(date -u +%T)" | tee -a "$LOG"
