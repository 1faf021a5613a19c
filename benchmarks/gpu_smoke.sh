#!/usr/bin/env bash
# GPU smoke test of the `gpu` preset on a machine without internet: a random-weight t5-base-sized checkpoint
# stands in for the pretrained one (same shapes), our own SentencePiece model for its spiece.model.
#   bash benchmarks/gpu_smoke.sh DATA_DIR OUT_DIR
# Prints SFT tokens/s, seconds per PPO iteration and peak GPU memory per stage (also in OUT_DIR/run/log.jsonl).
set -euo pipefail
DATA=$1; OUT=$2
mkdir -p "$OUT"
python3 - "$DATA" "$OUT" <<'PY'
import sys
from pathlib import Path
import torch
import data
from t5 import T5, T5Config
data_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
ckpt = out / "t5-base-random"
torch.manual_seed(0)
T5(T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12)).save_pretrained(ckpt)
texts = [data.format_context(ex.context + [ex.target])
         for ex in data.load_empathetic_dialogues(data_dir / "empatheticdialogues" / "train.csv")]
data.Tokenizer.train(texts, ckpt / "spiece.model", vocab_size=8000)
PY
python3 train.py --preset=gpu --pretrained="$OUT/t5-base-random" --data_dir="$DATA" --out_dir="$OUT/run" \
  --limit_train=1600 --limit_test=1000 --sft_epochs=1 --sft_eval_every=100 --sft_limit_valid=500 \
  --ident_epochs=1 --ppo_steps=40 --ppo_eval_every=20
