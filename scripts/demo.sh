#!/usr/bin/env bash
# The demo: tokenize tinyshakespeare -> train a small GPT-J on CPU -> sample -> export to Hugging Face format
# -> evaluate on LAMBADA through lm-evaluation-harness.
# Writes only under runs/ (runs/demo_data, runs/demo, runs/demo_hf), which it recreates.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${MTJ_ASSETS:?set MTJ_ASSETS to the shared assets folder (e.g. ../shared/assets)}"
PY="${PYTHON:-.venv/bin/python}"
TEXT="$MTJ_ASSETS/text/tinyshakespeare.txt"
rm -rf runs/demo_data runs/demo runs/demo_hf
mkdir -p runs/demo_data

echo "== 1/5 tokenize: the first 1,000,000 bytes for training, the rest for validation"
head -c 1000000 "$TEXT" > runs/demo_data/train.txt
tail -c +1000001 "$TEXT" > runs/demo_data/val.txt
"$PY" scripts/create_tfrecords.py runs/demo_data/train.txt shakespeare_train --output-dir runs/demo_data --seq 128
"$PY" scripts/create_tfrecords.py runs/demo_data/val.txt shakespeare_val --output-dir runs/demo_data --seq 128

echo "== 2/5 train (configs/demo.json; metrics in runs/demo/metrics.jsonl, curve in runs/demo/loss.png)"
"$PY" scripts/train.py --config configs/demo.json

echo "== 3/5 sample"
"$PY" scripts/sample.py --ckpt runs/demo --prompt "ROMEO:" --max-new-tokens 80 --temperature 0.8 --top-k 40 --seed 1

echo "== 4/5 export to Hugging Face format and load it with transformers"
"$PY" scripts/to_hf.py --ckpt runs/demo --out runs/demo_hf
"$PY" - <<'PY'
try:
    import transformers
except ImportError:
    print("(transformers is not installed: skipping the load check; pip install -e '.[hf]' for it)")
else:
    model = transformers.AutoModelForCausalLM.from_pretrained("runs/demo_hf")
    tok = transformers.AutoTokenizer.from_pretrained("runs/demo_hf")
    print(f"transformers loads runs/demo_hf: {type(model).__name__}, {model.num_parameters():,} parameters")
PY

echo "== 5/5 evaluate: the first 200 LAMBADA passages through lm-evaluation-harness (its lambada_openai, local data)"
if "$PY" -c "import lm_eval" 2>/dev/null; then
    "$PY" scripts/eval_harness.py --ckpt runs/demo --tasks lambada --limit 200
else
    echo "(lm-evaluation-harness is not installed: skipping; pip install -e '.[eval]' for it)"
fi
