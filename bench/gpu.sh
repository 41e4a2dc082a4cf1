#!/usr/bin/env bash
# The GPU checks of the data-path issue, as one prepared run (about 10 minutes on one H200):
#   1. bench/speed.py at the release architecture (ViT-S/16, 224 px) in bf16 on the GPU;
#   2. a timed pre-training run on a synthetic SLICE-3D-sized dataset (or --rows of it), release preset,
#      bf16, as many loader workers as the machine has cores less two.
# Needs an environment with a CUDA build of torch and this project installed (`pip install -e .`).
#
#   bash bench/gpu.sh [OUT_DIR] [ROWS] [STEPS]       # defaults: bench/results/gpu 100000 2000
set -euo pipefail
OUT=${1:-bench/results/gpu}
ROWS=${2:-100000}
STEPS=${3:-2000}
WORKERS=$(( $(nproc) > 3 ? $(nproc) - 2 : 1 ))
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))" | tee "$OUT/device.txt"

python bench/speed.py --model_size small --device cuda --dtype bfloat16 --lesions_per_step 256 --threads 0 \
    --sections train inference memory --output "$OUT/speed.json" 2> "$OUT/speed.md"

# A synthetic ISIC 2024 layout of ROWS rows (bench/data.py writes and tiles it), converted once.
python - "$OUT" "$ROWS" <<'EOF'
import sys
from pathlib import Path
from bench.data import DataBenchArguments
from bench.data_converter import subset_layout, synthetic_layout
out, rows = Path(sys.argv[1]), int(sys.argv[2])
args = DataBenchArguments(images=min(rows, 20000), sizes=[rows, rows])
layout = synthetic_layout(args, out / "work")
csv_path, hdf5_path = subset_layout(layout, rows, out / "work" / f"rows-{rows}")
print(csv_path, hdf5_path)
EOF
python -m training.prepare_data isic2024 --metadata "$OUT/work/rows-$ROWS/train-metadata.csv" \
    --images "$OUT/work/rows-$ROWS/train-image.hdf5" --output-dir "$OUT/work/dataset" --overwrite --image-check open

start=$(date +%s)
accelerate launch -q training/pretrain.py --dataset_dir "$OUT/work/dataset" --output_dir "$OUT/work/model" \
    --model_size small --mixed_precision bf16 --patients_per_batch 32 --max_lesions_per_patient 16 \
    --max_steps "$STEPS" --num_workers "$WORKERS" --eval_steps 0 --save_steps 0 --linear_probe false \
    --logging_steps 100 2>&1 | tee "$OUT/pretrain.log"
end=$(date +%s)
python - "$OUT" "$STEPS" "$((end - start))" <<'EOF'
import json, re, sys
out, steps, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rates = [float(m) for m in re.findall(r'"train/lesions_per_second": ([0-9.]+)', open(f"{out}/pretrain.log").read())]
result = {"steps": steps, "wall_seconds": seconds, "lesions_per_second_logged": rates[-5:],
          "slice3d_epoch_minutes": 401059 / max(rates[-1], 1e-9) / 60 if rates else None}
json.dump(result, open(f"{out}/pretrain.json", "w"), indent=2)
print(json.dumps(result, indent=2))
EOF
