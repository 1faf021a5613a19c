#!/usr/bin/env bash
# The GPU checks, one script for a machine that may be lent for minutes and has no internet:
#   1. bench_gpu.py at t5-base and t5-small sizes: per-stage times and peak memory, the full `gpu` preset
#      extrapolated from them;
#   2. the `gpu` preset through every stage, scaled down (a few hundred examples, 40 PPO iterations), on a
#      random-weight t5-base-sized checkpoint standing in for the pretrained one (same shapes) with our own
#      SentencePiece model as its spiece.model;
#   3. torchrun with one process (NCCL), the tiny preset: the distributed code path end to end.
#
#   bash benchmarks/gpu_smoke.sh DATA_DIR OUT_DIR            # on the GPU (about 10 minutes on an H100-class card)
#   bash benchmarks/gpu_smoke.sh DATA_DIR OUT_DIR --dry-run  # the same steps at tiny size on the CPU (a minute)
#
# Everything it prints is also in OUT_DIR: bench_*.txt, run/log.jsonl, torchrun/log.jsonl.
set -euo pipefail
DATA=$1; OUT=$2; MODE=${3:-}; PY=${PYTHON:-python3}  # PYTHON=path: the interpreter to use
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
if [ "$MODE" = "--dry-run" ]; then
  DEVICE=cpu; BENCH_SIZES="tiny"; BENCH_STEPS="--steps=2"; CKPT_SIZE=tiny; VOCAB=600
  LIMITS=(--limit_train=200 --limit_valid=32 --limit_test=32 --sft_eval_every=10 --sft_limit_valid=32
          --ident_epochs=1 --ident_limit_pairs=200 --label_limit_train=64 --ppo_steps=2 --ppo_eval_every=1
          --ppo_limit_valid=16 --ppo_batch_size=8 --ppo_mini_batch_size=4 --ppo_grad_accum=1 --eval_batch_size=32
          --dtype=bfloat16)
elif [ -z "$MODE" ]; then
  DEVICE=cuda; BENCH_SIZES="t5-base t5-small"; BENCH_STEPS=""; CKPT_SIZE=t5-base; VOCAB=8000
  LIMITS=(--limit_train=1600 --limit_test=1000 --sft_eval_every=100 --sft_limit_valid=500 --ident_epochs=1
          --ppo_steps=40 --ppo_eval_every=20)
else
  echo "usage: bash benchmarks/gpu_smoke.sh DATA_DIR OUT_DIR [--dry-run]" >&2; exit 2
fi

for size in $BENCH_SIZES; do
  echo "== 1. bench_gpu.py --size=$size --device=$DEVICE"
  "$PY" benchmarks/bench_gpu.py --size="$size" --device="$DEVICE" $BENCH_STEPS | tee "$OUT/bench_$size.txt"
done

echo "== 2. the gpu preset, scaled down, every stage ($DEVICE)"
"$PY" - "$DATA" "$OUT/checkpoint" "$CKPT_SIZE" "$VOCAB" <<'PY'
import sys
from pathlib import Path
import torch
import data
from t5 import T5, T5Config
data_dir, ckpt, size, vocab = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
shapes = {"t5-base": dict(d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12),
          "tiny": dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)}[size]
torch.manual_seed(0)
T5(T5Config(vocab_size=32128 if size == "t5-base" else vocab, **shapes)).save_pretrained(ckpt)
texts = [data.format_context(ex.context + [ex.target])
         for ex in data.load_empathetic_dialogues(data_dir / "empatheticdialogues" / "train.csv")]
data.Tokenizer.train(texts, ckpt / "spiece.model", vocab_size=vocab)
PY
"$PY" train.py --preset=gpu --device="$DEVICE" --pretrained="$OUT/checkpoint" --data_dir="$DATA" \
  --out_dir="$OUT/run" --sft_epochs=1 "${LIMITS[@]}"

echo "== 3. torchrun, one process ($DEVICE)"
"$PY" -m torch.distributed.run --standalone --nproc_per_node=1 train.py --preset=tiny --device="$DEVICE" \
  --data_dir="$DATA" --out_dir="$OUT/torchrun"
echo "== gpu_smoke: all steps passed"
