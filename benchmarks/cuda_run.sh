#!/usr/bin/env bash
# The CUDA figures in one go, for a machine with a GPU (run from the repository's root):
#
#     benchmarks/cuda_run.sh OUTDIR [TUTORIAL_CHECKOUT]
#
# Each step's stdout (JSON for the benchmarks) goes to OUTDIR/NAME.json, every step's stderr to
# OUTDIR/log.txt, and one line per step (exit status, milliseconds) to OUTDIR/steps.txt. Each step
# has its own time limit, so one that hangs or fails costs its own figures only, and DEADLINE_S
# (seconds) ends the whole run in time: a step that would start later is skipped, and the steps
# run most wanted first. PYTHON picks the interpreter (default python3); seesay is imported from
# this checkout's src/. The demo's dataset and run go to WORK (default /tmp/seesay-cuda); its
# summary and scores are copied to OUTDIR.
#
# Steps: the matmul roofline (float32; the --amp runs measure float16's), training throughput of
# every decoder at the tutorial's sizes in float32 and with --amp (float16 + GradScaler), where a
# step's time goes (host operations, GPU activities and busy time: --profile), 128 captions a
# step, the tutorial's encoder modes for soft attention, the demo sizes, batched and one-image
# decoding (with its operations and GPU activities per step), torch.compile on the attention
# scores and on whole decoders, the tutorial comparison (when a checkout is given), and a real
# run: the demo with --amp, then an SCST step against a cross-entropy step on the demo's model.
set -u
out=${1:?usage: benchmarks/cuda_run.sh OUTDIR [TUTORIAL_CHECKOUT]}
tutorial=${2:-}
py=${PYTHON:-python3}
work=${WORK:-/tmp/seesay-cuda}
dev=${DEVICE:-cuda}  # DEVICE=cpu: the same steps on the CPU (slow; to try the script)
deadline=${DEADLINE_S:-0}  # > 0: no step runs past this many seconds from the start (the rest are skipped)
started=$(date +%s)
mkdir -p "$out" "$work"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

step() {  # step NAME[.EXT] SECONDS COMMAND...: stdout to NAME.json (or NAME.EXT), stderr to log.txt
    local name=$1 limit=$2 file=$1 t0 rc left
    [[ $name == *.* ]] || file=$name.json
    shift 2
    if [ "$deadline" -gt 0 ]; then
        left=$((deadline - ($(date +%s) - started)))
        if [ "$left" -lt 5 ]; then
            printf '%-24s skipped (DEADLINE_S=%s)\n' "$name" "$deadline" | tee -a "$out/steps.txt"
            return
        fi
        [ "$left" -lt "$limit" ] && limit=$left
    fi
    echo "== $name ($(date -u +%T), limit ${limit}s): $*" >>"$out/log.txt"
    t0=$(date +%s%N)
    timeout --kill-after=10 "$limit" "$@" >"$out/$file" 2>>"$out/log.txt"
    rc=$?
    printf '%-24s rc=%-3s %6d ms\n' "$name" "$rc" $((($(date +%s%N) - t0) / 1000000)) | tee -a "$out/steps.txt"
}

B=benchmarks
step env 30 "$py" -c "import json, platform, torch, seesay; print(json.dumps({'torch': torch.__version__,
 'cuda': torch.version.cuda, 'gpu': torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, 'python': platform.python_version(),
 'cudnn': torch.backends.cudnn.version()}))"
step roofline 60 "$py" $B/roofline.py --device "$dev"
step train_tutorial_fp32 100 "$py" $B/train_throughput.py --device "$dev" --presets tutorial --steps 20 --warmup 5 \
    --varying --modes cached cached_grouped
step train_tutorial_amp 100 "$py" $B/train_throughput.py --device "$dev" --presets tutorial --steps 20 --warmup 5 \
    --varying --modes cached cached_grouped --amp
step train_profile 90 "$py" $B/train_throughput.py --device "$dev" --presets tutorial --steps 5 --warmup 3 \
    --varying --modes cached --no-roofline --profile
step train_profile_amp 90 "$py" $B/train_throughput.py --device "$dev" --presets tutorial --steps 5 --warmup 3 \
    --varying --modes cached --no-roofline --profile --amp
step train_batch128_fp32 100 "$py" $B/train_throughput.py --device "$dev" --presets tutorial --steps 10 --warmup 3 \
    --varying --modes cached cached_grouped --batch 128 --no-roofline
step train_batch128_amp 100 "$py" $B/train_throughput.py --device "$dev" --presets tutorial --steps 10 --warmup 3 \
    --varying --modes cached cached_grouped --batch 128 --no-roofline --amp
step decode 120 "$py" $B/decode_throughput.py --device "$dev" --preset all --sequential-images 20 --profile
if [ -n "$tutorial" ]; then
    step tutorial_compare 90 "$py" $B/tutorial_compare.py --tutorial "$tutorial" --device "$dev" --with-encoder \
        --steps 20 --warmup 5 --profile
fi
step demo_amp.txt 150 "$py" -m seesay demo --output "$work/demo" --minutes 1 --set train.amp=true --no-progress
for f in demo_summary.json test_metrics.json baseline_metrics.json run/metrics.jsonl; do
    [ -f "$work/demo/$f" ] && cp "$work/demo/$f" "$out/demo_$(basename "$f")"
done
step scst_step 60 "$py" $B/scst_step.py --checkpoint "$work/demo/run/best" --data "$work/demo/data" --device "$dev" \
    --steps 20 --warmup 3
step compile 90 "$py" $B/compile_check.py --device "$dev"
step train_compiled 150 "$py" $B/train_throughput.py --device "$dev" --presets tutorial \
    --decoders soft_attention transformer --modes cached --steps 10 --warmup 2 --no-roofline --compile
step train_encoder_fp32 60 "$py" $B/train_throughput.py --device "$dev" --presets tutorial --decoders soft_attention \
    --tutorial-encoder --modes encoder_grouped encoder_per_caption --steps 8 --warmup 2 --varying --no-roofline
step train_encoder_amp 60 "$py" $B/train_throughput.py --device "$dev" --presets tutorial --decoders soft_attention \
    --tutorial-encoder --modes encoder_grouped encoder_per_caption --steps 8 --warmup 2 --varying --no-roofline --amp
step train_demo_amp 60 "$py" $B/train_throughput.py --device "$dev" --presets demo --steps 20 --warmup 5 --varying \
    --modes cached encoder_grouped --amp --no-roofline
