#!/usr/bin/env bash
# GPU-machine sessions: install the wheels the image lacks, run the GPU tests, the benchmarks and the one-GPU
# pretrain + finetune demonstration. Run from the repo root on the device machine:
#   bash benchmarks/gpu_session.sh STAGE...
# STAGEs, in the order given:
#   install-a    fla-core, flash-linear-attention, pydantic, ... (.gpu/core: shared/gpu/fetch-wheels.sh's core set
#                and isal==1.9.1, which that set lacks and the sharder imports) + tilelang (.gpu/tla) into /tmp/site,
#                and the Triton autotune results + tilelang kernels of an earlier session (.gpu/cache), if any
#   install-b    z3-solver (.gpu/tlb), which tilelang needs (split off: the carry limit is 64 MiB per call)
#   install-mlflow  mlflow-skinny and its deps (.gpu/mlflow)
#   tests        pytest -m gpu tests/test_ops_fused.py tests/test_model_gpu.py
#   tests-inputs our Triton kernels (Comba input stage and WY form, bridge convs) against the reference, the fused layer/model
#                parity, no host syncs
#   tests-graphs the captured steps: finetuning, the pretraining trainer and the pretraining benchmark's capture
#   tests-precision  the bf16-vs-fp32 training test alone (four 200-step runs, ~5 min)
#   tests-numerics  what found the WY inverse's and flex's bugs (2026-12-04), in one stage: sliding-window
#                attention (T = 101 included), eager flex past dynamo's recompile limit, the bf16-vs-fp32 training
#                test, the captured finetuning (~9 min)
#   tests-all    every GPU-marked test but telemetry's, in four pytest processes at once on the one GPU (the
#                bf16-vs-fp32 training test alone in one; ~9 min): logs tests-all-{train,kernels,fused,steps}.log
#   precision    benchmarks/precision_curves.py: fp32 and bf16 training, three seeds each, six processes at once
#   graph-b150   launcher.train on the 8m demo config as it is (B=150, captured by default): exit code, GPU memory
#   trainer-graph  launcher.train on the 8m demo config at B=32, compiled, cuda_graph=off then auto (tokens/s)
#   tests-rerun  the slower of those only: full model vs float64, bf16 vs fp32 training, CUDA graph, host syncs
#   telemetry    pytest -m gpu tests/test_telemetry_gpu.py (needs install-mlflow)
#   overhead     benchmarks/logging_overhead.py on the GPU (needs install-mlflow; data in runs/devdata/gb)
#   kernels      benchmarks/kernels_bench.py (Comba and attention floors at B=150)
#   eager        crossdna bench train-step, eager, bf16 Comba (with a profile)
#   compiled     the same with torch.compile
#   tiles-bench  benchmarks/triton_tiles_bench.py: our Triton kernels per tile shape, against their floors
#   b150         compiled, B=150 alone, with a profile (BENCH_TAG names the result file)
#   autotune-b150  the same with torch.compile's max-autotune (no CUDA graphs): Triton GEMM templates and flex configs
#   overlap-b150 b150 with the teacher's passes on a second CUDA stream (--overlap-teacher)
#   best-b150    the best configuration: b150 with --overlap-teacher and the whole step captured (--cuda-graph)
#   flex-tiles   benchmarks/triton_tiles_bench.py flex: FlexAttention's block mask and kernel options
#   base-b150    the same on the source tree in .gpu/base (e.g. `git archive` of an earlier commit): a baseline
#                measured on the same machine
#   graphed      compiled, timed uncaptured and then with the whole step captured as one CUDA graph
#   budget       compiled with activation_budget $BUDGET (default 0.5; several values: BUDGET="0.95 0.9"), B=150
#                (memory for time)
#   faithful     eager with fp32 Comba (the upstream numerics)
#   faithful-compiled  fp32 Comba with torch.compile
#   pretrain     shard the full chr20 and pretrain configs/pretrain/8m-chr20-1gpu.yaml into /tmp/run-8m; the
#                loss/throughput/GPU plots, the step log, the trainer state and the log come back in pretrain.tgz,
#                the weights in 15 MiB parts (cat them; the sha256 is in session.log) and stay on the machine
#   finetune     GUE tf0-4, 3 seeds of FT_STEPS (200) steps in bf16, from the pretrained weights and from scratch:
#                five processes at a time on the one GPU (captured steps), then benchmarks/compare_finetune.py
#                (data in runs/devdata/gue); every run's results and log come back in ft.tgz; FT_INIT=...
#                finetunes another pretrained source
#   save-cache   the autotune results and tilelang kernels to $OUT/autotune_cache.tgz, for the next session
# Everything written under $OUT (logs, JSON, plots) comes back; the chr20 FASTA is expected in .gpu/chr20/.
# With the `run` tool: call 1 carries .gpu/core .gpu/tla .gpu/cache and runs `install-a`; the next call, within
# the 30 s the machine stays warm, carries .gpu/tlb .gpu/chr20 and runs `install-b STAGE...`; a later call carries
# .gpu/mlflow runs/devdata for the stages that need them. Carried folders are copied to /tmp on first use, so a
# later call need not carry them again. Cold Triton autotuning and tilelang compilation take minutes; with
# .gpu/cache/autotune_cache.tgz from `save-cache` a bench warms up in ~1 min.
set -uo pipefail
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
if [ -f .gpu/chr20/20.fa.gz ]; then mkdir -p /tmp/chr20 && cp -u .gpu/chr20/* /tmp/chr20/; fi
export CROSSDNA_CHR20_FASTA=/tmp/chr20/20.fa.gz
RUN=/tmp/run-8m
OUT=${OUT:-/tmp/crossdna-out}
mkdir -p "$OUT"
LOG=$OUT/session.log
# The wheels of the named .gpu folders; a folder that did not travel ends the session, named (pip would reject the
# unexpanded glob and install none of the others)
pip_install() {
  local wheels=() dir
  for dir in "$@"; do
    [ -n "$(ls .gpu/$dir/*.whl 2>/dev/null)" ] || { echo "no wheels in .gpu/$dir: name it in the call's carry" | tee -a "$LOG"; exit 2; }
    wheels+=(.gpu/$dir/*.whl)
  done
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${wheels[@]}"
}
ft_dirs() { printf "/tmp/ft/$1-tf%s," 0 1 2 3 4 | sed 's/,$//'; }
bench() { timeout "$1" python3 -m crossdna.cli bench train-step --fasta "$CROSSDNA_CHR20_FASTA" --out "$OUT" "${@:2}"; }
for stage in "$@"; do
  echo "=== $stage $(date -u +%T)" | tee -a "$LOG"
  case $stage in
    install-a) pip_install core tla 2>&1 | tail -3 | tee -a "$LOG" || exit 2
               if [ -f .gpu/cache/autotune_cache.tgz ]; then tar xzf .gpu/cache/autotune_cache.tgz -C ~; fi ;;
    install-b) pip_install tlb 2>&1 | tail -3 | tee -a "$LOG" || exit 2
               python3 -c "import torch, triton, fla, tilelang, isal, pyfaidx, webdataset; from crossdna.ops import fused; print(torch.__version__, triton.__version__, fla.__version__, tilelang.__version__, torch.cuda.get_device_name(0), 'fused unavailable:', repr(fused.UNAVAILABLE))" 2>&1 | tail -3 | tee -a "$LOG" ;;
    install-mlflow) pip_install mlflow 2>&1 | tail -3 | tee -a "$LOG" || exit 2 ;;
    tests) timeout 420 python3 -m pytest tests/test_ops_fused.py tests/test_model_gpu.py -m gpu -v -rs --tb=line -p no:logging --timeout 300 2>&1 | grep -E "PASS|FAIL|ERROR|SKIP|assert|Error|passed|failed" | tail -60 | tee -a "$LOG" ;;
    tests-inputs) timeout 400 python3 -m pytest tests/test_ops_comba_inputs.py tests/test_ops_comba_wy.py tests/test_ops_comba_output.py tests/test_ops_dwconv.py tests/test_ops_fused.py -m gpu -k "${INPUT_TESTS:-on_gpu or layer or model_fp32 or host_sync}" -v -rA --tb=short -p no:logging --timeout 300 > "$OUT/tests-inputs.log" 2>&1
                  grep -E "PASS|FAIL|ERROR|SKIP|assert|Error|passed|failed" "$OUT/tests-inputs.log" | tail -30 | tee -a "$LOG" ;;
    tests-graphs) timeout 450 python3 -m pytest tests/test_finetune_gpu.py tests/test_launcher_gpu.py tests/test_ops_fused.py -m gpu -k "${GRAPH_TESTS:-graph or captured}" -v -rA --tb=long -p no:logging --timeout 350 > "$OUT/tests-graphs.log" 2>&1
                  grep -E "PASS|FAIL|ERROR|SKIP|assert|Error|passed|failed" "$OUT/tests-graphs.log" | tail -30 | tee -a "$LOG" ;;
    tests-precision) timeout 590 python3 -m pytest tests/test_ops_fused.py -m gpu -k bf16_training -v -rA --tb=long -p no:logging --timeout 580 > "$OUT/tests-precision.log" 2>&1
                     grep -E "PASS|FAIL|ERROR|assert|passed|failed" "$OUT/tests-precision.log" | tail -12 | tee -a "$LOG" ;;
    tests-numerics) timeout 590 python3 -m pytest tests/test_ops_fused.py tests/test_finetune_gpu.py -m gpu -k "sliding_window or outlasts or bf16_training or graphed_finetune" -v -rA --tb=long -p no:logging --timeout 450 > "$OUT/tests-numerics.log" 2>&1
                    grep -E "PASS|FAIL|ERROR|assert|passed|failed" "$OUT/tests-numerics.log" | tail -20 | tee -a "$LOG" ;;
    tests-all) pytest_group() { timeout 550 python3 -m pytest "${@:2}" -m gpu -v -rA --tb=long -p no:logging --timeout 500 > "$OUT/tests-all-$1.log" 2>&1; }
               pytest_group train tests/test_ops_fused.py -k bf16_training &
               pytest_group kernels tests/test_ops_comba_inputs.py tests/test_ops_comba_output.py tests/test_ops_comba_wy.py \
                 tests/test_ops_dwconv.py tests/test_ops_fused.py -k "on_gpu or registered or comba_matches or sliding_window or outlasts or rotary" &
               pytest_group fused tests/test_ops_fused.py -k "layer_fp32 or model_fp32 or host_sync or cuda_graph or teacher" &
               pytest_group steps tests/test_model_gpu.py tests/test_finetune_gpu.py tests/test_launcher_gpu.py tests/test_objectives.py &
               wait
               for name in train kernels fused steps; do
                 grep -E "PASS|FAIL|ERROR|assert|passed|failed" "$OUT/tests-all-$name.log" | grep -v "^tests/.*PASSED" | tail -8 | sed "s/^/$name: /" | tee -a "$LOG"
               done ;;
    precision) mkdir -p "$OUT/precision"  # three seeds per precision at once: ~10 GiB per process in fp32
               for p in fp32 bf16; do for s in 0 1 2; do
                 timeout 420 python3 benchmarks/precision_curves.py run --precision $p --seed $s --fasta "$CROSSDNA_CHR20_FASTA" --out "$OUT/precision" > "/tmp/precision-$p-$s.log" 2>&1 &
               done; done
               wait
               tail -qn 1 /tmp/precision-*.log | tee -a "$LOG" ;;
    graph-b150) timeout 60 python3 -m crossdna.cli shard build --config configs/shard/chr20.yaml --out /tmp/chr20-shards --quiet fasta="$CROSSDNA_CHR20_FASTA" 2>&1 | tail -2 | tee -a "$LOG"
               nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > /tmp/gpumem.txt &
               timeout 420 python3 -m launcher.train --config configs/pretrain/8m-chr20-1gpu.yaml data.path=/tmp/chr20-shards trainer.run_dir=/tmp/graph-b150 trainer.steps=${GRAPH_STEPS:-40} trainer.eval_every=0 trainer.ckpt_every=0 tracking.enabled=false > "$OUT/graph-b150.log" 2>&1
               echo "B=150 captured exit $?; GPU memory used at most $(sort -n /tmp/gpumem.txt | tail -1) MiB" | tee -a "$LOG"; kill %1
               grep -E "captured|replayed|step +[0-9]+/|Error" "$OUT/graph-b150.log" | tail -4 | tee -a "$LOG" ;;
    trainer-graph) timeout 60 python3 -m crossdna.cli shard build --config configs/shard/chr20.yaml --out /tmp/chr20-shards --quiet fasta="$CROSSDNA_CHR20_FASTA" 2>&1 | tail -2 | tee -a "$LOG"
               for mode in off auto; do  # the 8m demo config at B=32, compiled: eager steps, then captured
                 timeout 280 python3 -m launcher.train --config configs/pretrain/8m-chr20-1gpu.yaml data.path=/tmp/chr20-shards trainer.run_dir=/tmp/graph-$mode trainer.micro_batch=32 trainer.steps=${GRAPH_STEPS:-120} trainer.eval_every=0 trainer.ckpt_every=0 tracking.enabled=false trainer.cuda_graph=$mode > "$OUT/trainer-graph-$mode.log" 2>&1
                 echo "cuda_graph=$mode exit $?" | tee -a "$LOG"
                 python3 - "$mode" <<'PY' 2>&1 | tee -a "$LOG"
import json, statistics, sys
recs = [json.loads(l) for l in open(f"/tmp/graph-{sys.argv[1]}/train_log.jsonl") if "perf/tokens_per_s" in l]
tail = [r["perf/tokens_per_s"] for r in recs if r["step"] > 20]  # after warm-up, compilation and capture
print(f"cuda_graph={sys.argv[1]}: steps {len(recs)}, median {statistics.median(tail) / 1e3:.1f}k tokens/s over steps 21-{recs[-1]['step']}, final ce {recs[-1]['train/ce']:.4f}")
PY
               done ;;
    tests-rerun) timeout 420 python3 -m pytest tests/test_ops_fused.py tests/test_model_gpu.py -m gpu -k "model_fp32 or bf16_training or cuda_graph or host_sync or agree" -v -rA --tb=short -p no:logging --timeout 300 2>&1 | grep -E "PASS|FAIL|ERROR|SKIP|assert|Error|passed|failed|fp32 |bf16 " | tail -40 | tee -a "$LOG" ;;
    telemetry) timeout 200 python3 -m pytest tests/test_telemetry_gpu.py -m gpu -v -rs --tb=short -p no:logging --timeout 150 2>&1 | grep -E "PASS|FAIL|ERROR|SKIP|assert|Error|passed|failed" | tail -30 | tee -a "$LOG" ;;
    overhead) timeout 240 python3 benchmarks/logging_overhead.py --device cuda --data runs/devdata/gb/regulatory_ensembl_train_subsample.tsv --out "$OUT/logging_overhead_h100.json" 2>&1 | tail -8 | tee -a "$LOG" ;;
    kernels) timeout "${KERNELS_TIMEOUT:-540}" python3 benchmarks/kernels_bench.py "$OUT" 2>&1 | grep -v -i "warn\|tilelang" | tail -12 | tee -a "$LOG" ;;
    eager) bench 200 --comba-precision autocast --warmup 3 --steps 10 --profile 2 2>&1 | grep -v TileLang | tail -6 | tee -a "$LOG" ;;
    compiled) bench 330 --comba-precision autocast --compile --warmup 3 --steps 10 --profile 2 2>&1 | grep -v TileLang | tail -6 | tee -a "$LOG" ;;
    graphed) bench 400 --comba-precision autocast --compile --cuda-graph --warmup 3 --steps 20 --profile 2 2>&1 | grep -v TileLang | tail -6 | tee -a "$LOG" ;;
    tiles-bench) timeout 400 python3 benchmarks/triton_tiles_bench.py "$OUT" 2>&1 | tail -8 | tee -a "$LOG" ;;
    autotune-b150) bench 590 --batch 150 --comba-precision autocast --compile --compile-mode max-autotune-no-cudagraphs --warmup 3 --steps 10 --profile 2 ${BENCH_TAG:+--tag "$BENCH_TAG"} 2>&1 | grep -v TileLang | tail -6 | tee -a "$LOG" ;;
    flex-tiles) timeout 400 python3 benchmarks/triton_tiles_bench.py "$OUT" flex 2>&1 | grep -v TileLang | tail -16 | tee -a "$LOG" ;;
    overlap-b150) bench 400 --batch 150 --comba-precision autocast --compile --overlap-teacher --warmup 3 --steps 10 --profile 2 ${BENCH_TAG:+--tag "$BENCH_TAG"} 2>&1 | grep -v TileLang | tail -6 | tee -a "$LOG" ;;
    best-b150) bench 400 --batch 150 --comba-precision autocast --compile --overlap-teacher --cuda-graph --warmup 3 --steps 10 --profile 2 ${BENCH_TAG:+--tag "$BENCH_TAG"} 2>&1 | grep -v TileLang | tail -6 | tee -a "$LOG" ;;
    b150) bench 400 --batch 150 --comba-precision autocast --compile --warmup 3 --steps 10 --profile 2 ${BENCH_TAG:+--tag "$BENCH_TAG"} 2>&1 | grep -v TileLang | tail -6 | tee -a "$LOG" ;;
    base-b150) (cd .gpu/base && PYTHONPATH=/tmp/site:$PWD timeout 400 python3 -m crossdna.cli bench train-step --fasta "$CROSSDNA_CHR20_FASTA" --out "$OUT" --batch 150 --comba-precision autocast --compile --warmup 3 --steps 10 --profile 2 --tag base_b150_compile) 2>&1 | grep -v TileLang | tail -6 | tee -a "$LOG" ;;
    budget) for b in ${BUDGET:-0.5}; do  # one run per value, each a recompilation; the result file is named by it
              bench 400 --batch 150 --comba-precision autocast --compile --activation-budget "$b" --warmup 3 --steps 10 ${BENCH_TAG:+--tag "${BENCH_TAG}_budget$b"} > "$OUT/budget$b.log" 2>&1
              echo "budget $b exit $?" | tee -a "$LOG"; grep -v TileLang "$OUT/budget$b.log" | tail -2 | tee -a "$LOG"
            done ;;
    pretrain) timeout 60 python3 -m crossdna.cli shard build --config configs/shard/chr20.yaml --out /tmp/chr20-shards --quiet fasta="$CROSSDNA_CHR20_FASTA" 2>&1 | tail -2 | tee -a "$LOG"
              start=$(date +%s)
              timeout 560 python3 -m launcher.train --config configs/pretrain/8m-chr20-1gpu.yaml data.path=/tmp/chr20-shards trainer.run_dir=$RUN > "$OUT/pretrain.log" 2>&1
              echo "pretrain exit $? after $(( $(date +%s) - start )) s" | tee -a "$LOG"
              grep -E "step +(200|400|600|800|1000)/|eval|wrote|exit" "$OUT/pretrain.log" | grep -v TileLang | tail -20 | tee -a "$LOG"
              run_id=$(python3 -c "import json; print(json.load(open('$RUN/checkpoints/$(cat $RUN/checkpoints/latest)/trainer.json'))['tracking_run_id'])")
              python3 -m crossdna.cli report "$run_id" --run-dir $RUN --out /tmp/report 2>&1 | tail -3 | tee -a "$LOG"
              cp "$RUN/checkpoints/$(cat $RUN/checkpoints/latest)/trainer.json" $RUN/train_log.jsonl "$OUT/pretrain.log" /tmp/report/
              tar czf "$OUT/pretrain.tgz" -C /tmp report && rm "$OUT/pretrain.log"
              split -b 15m -d "$RUN/model.safetensors" "$OUT/model.safetensors.part-" && sha256sum "$RUN/model.safetensors" | tee -a "$LOG" ;;
    finetune) mkdir -p /tmp/ft
              # Both arms run Comba under bf16 autocast (the pretraining config's choice; the 8m preset's is fp32).
              FT_MODEL="train.model_overrides=[use_ema_teacher=false, dropout=0.1, bridge_dropout=0.05, gate_freeze_steps=0, comba.precision=autocast]"
              for init in pretrained scratch; do  # one wave of five processes per init: ~6 GiB each in bf16
                src=$([ $init = pretrained ] && echo "${FT_INIT:-$RUN/model.safetensors}" || echo scratch)
                for t in 0 1 2 3 4; do
                  timeout 280 python3 -m crossdna.cli benchmark --suite gue-tf --tasks "tf$t" --init "$src" --out "/tmp/ft/$init-tf$t" --quiet --no-tracking data_root=runs/devdata train.device=cuda train.precision=bf16 "$FT_MODEL" train.max_steps="${FT_STEPS:-200}" > "/tmp/ft/$init-tf$t.log" 2>&1 &
                done
                wait
                echo "$init done $(date -u +%T)" | tee -a "$LOG"
              done
              tail -n 3 /tmp/ft/*.log | grep -v TileLang | tail -40 | tee -a "$LOG"
              tar czf "$OUT/ft.tgz" -C /tmp ft  # every run's results.json and log, also when a task did not finish
              python3 benchmarks/compare_finetune.py --out "$OUT/gue_tf_pretrained_vs_scratch" \
                "scratch=$(ft_dirs scratch)" "pretrained=$(ft_dirs pretrained)" 2>&1 | tee -a "$LOG" ;;
    faithful) bench 200 --comba-precision fp32 --warmup 3 --steps 10 --profile 2 2>&1 | grep -v TileLang | tail -6 | tee -a "$LOG" ;;
    faithful-compiled) bench 330 --comba-precision fp32 --compile --warmup 3 --steps 10 --profile 2 2>&1 | grep -v TileLang | tail -6 | tee -a "$LOG" ;;
    save-cache) (cd ~ && find .triton/cache -name '*.autotune.json' > /tmp/autotune.list && tar czf "$OUT/autotune_cache.tgz" -T /tmp/autotune.list .tilelang) ;;
    *) echo "unknown stage $stage" | tee -a "$LOG"; exit 2 ;;
  esac
done
echo "=== done $(date -u +%T)" | tee -a "$LOG"
