#!/usr/bin/env bash
# Runs on a GPU host (README: "An offline GPU machine"): the measure validation, the MFU and decode
# roofline benchmarks and study sweeps at the gpu preset; results land in $OUT/<device-slug>/.
# usage: benchmarks/gpu_reference.sh PART...
#   PART in: validate overhead mfu mfu-small mfu-large mfu-paper mfu-paper152k roofline
#            roofline-tuning roofline-fused kernels kernels-bf16 quant-engine finetune-1.5b
#            finetune-1.5b-qlora finetune-1.5b-dropout0 bf16-agreement
#            multigpu inference attention
#            attention_free finetuning_general finetuning_qlora cross_modal_dit_attention
#            cross_modal_peft scaling_{inference,finetuning,moe,attention}
#            paper_{inference,finetuning,pretraining}
# env: SWEEP_ARGS (extra sweep options, e.g. "--only method=freeze,full --set train.steps=60"),
#      SWEEP_BUDGET_S (time box per sweep, default 3000), SWEEPS (sweep output root, default
#      outputs/gpu_sweeps: kept between calls on a warm machine, so a sweep resumes there).
set -uo pipefail
if [ "${1:-}" = --help ] || [ $# -eq 0 ]; then sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0; fi
OUT=${OUT:-outputs/reference}
SWEEPS=${SWEEPS:-outputs/gpu_sweeps}
slug=$(python3 -c "import torch;from effllm_helpers.measure.device import device_slug;print(device_slug(torch.cuda.get_device_name(0)))") || exit 1
dest="$OUT/$slug"; mkdir -p "$dest" "$SWEEPS"
log() { echo "== $* ($(date +%T))" | tee -a "$dest/commands.txt"; }
failed=0
# a failed part says so in commands.txt and in the exit status (its older outputs may remain)
status() { local rc=$1; if [ "$rc" -ne 0 ]; then echo "!! exit $rc" | tee -a "$dest/commands.txt"; failed=1; fi; }
bench() { log "python3 benchmarks/$*"; python3 "benchmarks/$@" 2>&1 | tail -25; status "${PIPESTATUS[0]}"; }
for part in "$@"; do
  case $part in
    validate) bench gpu_validate.py --out "$dest" ;;
    overhead) bench gpu_validate.py --skip a,b --out "$dest/overhead" ;;
    mfu)      bench pretrain_mfu.py --out "$dest" ;;
    mfu-large) bench pretrain_mfu.py --size large --batch-size 32 --out "$dest/large" ;;
    # the attention sweep's GQA model (gpu small, 16 x 1024): its record's MFU is the peer
    mfu-small) bench pretrain_mfu.py --size small --batch-size 16 --out "$dest/gpu-small" ;;
    mfu-paper) bench pretrain_mfu.py --preset paper --size small --batch-size 16 --impls hf,liger --out "$dest/paper-small"
               bench pretrain_mfu.py --preset paper --size medium --batch-size 8 --out "$dest/paper-medium" ;;
    # the paper's 0.5 B dimensions with its own 152k vocabulary (Qwen2.5-0.5B), HF vs liger
    mfu-paper152k) bench pretrain_mfu.py --preset paper --size small --batch-size 16 --vocab 151936 --impls hf,liger --out "$dest/paper-small-vocab152k" ;;
    # the engine's GEMV tuning against its cuBLAS peer in one run, at 2.84 B
    roofline-tuning) bench decode_roofline.py --sizes paper:large --variants static_graph_compiled_k static_graph_compiled_k_cublas --profile --out "$dest/roofline-gemv-tuning" ;;
    # issue 28: fused q/k/v and gate/up projections against the unfused engine, in one run,
    # at 1.36 B and 2.84 B (per-token kernel profiles of both)
    roofline-fused) bench decode_roofline.py --sizes paper:medium paper:large --variants static_graph_compiled_k static_graph_compiled_k_fused --profile --out "$dest/roofline-fused" ;;
    # int4 weight-only through the engine at 2.9 B: bf16, GemLite, torchao tinygemm
    quant-engine) bench quant_kernels_check.py --size 3b --engine --skip-step --precisions bf16,int4-gemlite,int4-wo --out "$dest/quant_kernels_3b_engine.json" ;;
    # issue 28.4-5: fla's NSA and Mamba and the references under bf16, each against the fp32
    # reference (the yardstick kernels_check's fixed bf16 bounds lacked), GQA the control
    bf16-agreement) bench bf16_agreement.py --out "$dest/bf16-agreement" ;;
    # fla against the references under bf16 autocast, and the timed steps beside GQA
    kernels-bf16) mkdir -p "$dest/kernels-bf16"; bench kernels_check.py --only nsa,gqa,rwkv,mamba --phases agreement_bf16,step_fla,step_reference --budget-s 240 --out "$dest/kernels-bf16" ;;
    # issue 25: the fine-tuning methods at Qwen2.5-1.5B's shape (random weights) on ~8 packed
    # 1024-token rows a step, compiled; QLoRA (bitsandbytes nf4 base) apart
    finetune-1.5b) bench finetune_scale.py --shape qwen2.5-1.5b --methods full,lora,dora,rslora,freeze --rows 8 --steps 25 --compile --out "$dest/finetune-1.5b" ;;
    # LoRA without adapter dropout beside the paper's 0.1 (peft keeps a dropped copy of each
    # adapted layer's input for the backward): how much of LoRA's step is that traffic
    finetune-1.5b-dropout0) bench finetune_scale.py --shape qwen2.5-1.5b --methods lora --lora-dropout 0 --rows 8 --steps 25 --compile --out "$dest/finetune-1.5b-dropout0" ;;
    finetune-1.5b-qlora) bench finetune_scale.py --shape qwen2.5-1.5b --methods lora --quant nf4 --rows 8 --steps 25 --compile --out "$dest/finetune-1.5b" ;;
    multigpu) bench multigpu_check.py --out "$dest" ;;  # needs nvidia-h200-x2
    kernels)  bench kernels_check.py --out "$dest" ;;
    roofline) bench decode_roofline.py --sizes gpu:medium paper:small paper:medium paper:large --out "$dest" ;;
    inference|attention|attention_free|finetuning_general|finetuning_qlora|cross_modal_*|scaling_*|paper_*)
              f=params/$part.yaml; [ -f "$f" ] || f=params/architecture/$part.yaml
              [ -f "$f" ] || f=params/finetuning/${part#finetuning_}.yaml
              [ -f "$f" ] || f=params/cross_modal/${part#cross_modal_}.yaml
              [ -f "$f" ] || f=params/scaling/${part#scaling_}.yaml
              [ -f "$f" ] || f=params/paper/${part#paper_}.yaml
              # issue 26's studies: scaling_* at the gpu preset, paper_* at the paper preset
              preset=gpu; case $part in paper_*) preset=paper ;; esac
              # a run's limit: a cross-modal DiT trains 3000 steps from scratch (MoE with the
              # expert loop: ~5 min on an H200), the others finish in well under 5 min
              to=300; case $part in cross_modal_*|paper_*) to=600 ;; esac
              log "python3 -m effllm_helpers.cli sweep $f -p $preset -o <sweeps> --timeout $to ${SWEEP_ARGS:-}"
              # a time box per sweep, so the summary and the packing still happen; a killed sweep
              # loses only its run in flight, and the next call resumes from the records
              # shellcheck disable=SC2086
              timeout "${SWEEP_BUDGET_S:-3000}" python3 -m effllm_helpers.cli sweep "$f" -p "$preset" \
                -o "$SWEEPS" --no-progress --timeout "$to" ${SWEEP_ARGS:-} 2>&1 | tail -25
              status "${PIPESTATUS[0]}"
              for r in "$SWEEPS"/runs/"$part"/*/record.json; do
                [ -f "$r" ] && python3 -c "import json,sys;d=json.load(open(sys.argv[1]));print(d['study'],d['run_id'],d['status'],d['finished_at'],(d.get('error') or {}).get('reason','')[:80])" "$r"
              done | sort > "$dest/sweep_status-$part.txt"
              cat "$dest/sweep_status-$part.txt"
              # the run folders nest too deep to come back one by one: pack them
              find "$SWEEPS/runs/$part" -name runner.log -size +200k -delete 2>/dev/null
              tar -czf "$dest/sweeps-$part.tar.gz" -C "$SWEEPS" "runs/$part" ;;
    *) echo "unknown part $part"; failed=1 ;;
  esac
done
ls -la "$dest"
exit $failed
