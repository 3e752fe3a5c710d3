#!/usr/bin/env bash
# Runs on a lent GPU (see ../shared/gpu/README.md): the measure validation, the two roofline/MFU
# benchmarks and study sweeps at the gpu preset; everything lands in $OUT/<device-slug>/.
# usage: benchmarks/gpu_reference.sh PART...
#   PART in: validate overhead mfu mfu-large roofline inference attention finetuning_general
#            finetuning_qlora
set -uo pipefail
if [ "${1:-}" = --help ] || [ $# -eq 0 ]; then sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'; exit 0; fi
OUT=${OUT:-outputs/reference}
slug=$(python3 -c "import torch,re;print(re.sub('-+','-',''.join(c.lower() if c.isalnum() else '-' for c in torch.cuda.get_device_name(0))).strip('-'))")
dest="$OUT/$slug"; mkdir -p "$dest"
log() { echo "== $* ($(date +%T))" | tee -a "$dest/commands.txt"; }
for part in "$@"; do
  case $part in
    validate) log "python3 benchmarks/gpu_validate.py --out $dest"
              python3 benchmarks/gpu_validate.py --out "$dest" 2>&1 | tail -40 ;;
    overhead) log "python3 benchmarks/gpu_validate.py --skip a,b --out $dest/overhead"
              python3 benchmarks/gpu_validate.py --skip a,b --out "$dest/overhead" 2>&1 | tail -8 ;;
    mfu)      log "python3 benchmarks/pretrain_mfu.py --out $dest"
              python3 benchmarks/pretrain_mfu.py --out "$dest" 2>&1 | tail -15 ;;
    mfu-large) log "python3 benchmarks/pretrain_mfu.py --size large --batch-size 32 --out $dest/large"
              python3 benchmarks/pretrain_mfu.py --size large --batch-size 32 --out "$dest/large" 2>&1 | tail -15 ;;
    roofline) log "python3 benchmarks/decode_roofline.py --out $dest"
              python3 benchmarks/decode_roofline.py --out "$dest" 2>&1 | tail -15 ;;
    inference|attention|finetuning_general|finetuning_qlora)
              f=params/$part.yaml; [ -f "$f" ] || f=params/architecture/$part.yaml
              [ -f "$f" ] || f=params/finetuning/${part#finetuning_}.yaml
              log "python3 -m effllm_helpers.cli sweep $f -p gpu -o $dest/sweeps ${SWEEP_ARGS:-}"
              # a time box per sweep (SWEEP_BUDGET_S) so the summary and the packing still happen
              timeout "${SWEEP_BUDGET_S:-3000}" python3 -m effllm_helpers.cli sweep "$f" -p gpu \
                -o "$dest/sweeps" --no-progress --timeout 300 ${SWEEP_ARGS:-} 2>&1 | tail -25
              for r in "$dest"/sweeps/runs/*/*/record.json; do
                [ -f "$r" ] && python3 -c "import json,sys;d=json.load(open(sys.argv[1]));print(d['study'],d['run_id'],d['status'],d['finished_at'],(d.get('error') or {}).get('reason','')[:80])" "$r"
              done | sort | tee -a "$dest/sweep_status.txt"
              tar -czf "$dest/sweeps-$part.tar.gz" -C "$dest" sweeps && rm -rf "$dest/sweeps" ;;
    *) echo "unknown part $part" ;;
  esac
done
# the run folders nest too deep to come back one by one: pack them (unpacked where committed)
find "$dest" -name runner.log -size +200k -delete 2>/dev/null
ls -la "$dest"
