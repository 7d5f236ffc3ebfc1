#!/usr/bin/env bash
# Device checks for a lent GPU machine (the `device` tool), in one call: the test suite with CUDA present, then the
# throughput and time-to-accuracy benchmarks on the GPU (ONLY_TESTS=1: the tests alone). Carried along: .whl/ (wheels the machine lacks: pydantic
# and what it needs, for its Python 3.12) and .devdata/FashionMNIST/raw/*.gz (Debian's Fashion-MNIST files).
# Results go to $OUT; benchmarks/RESULTS.md records them.
set -uo pipefail
OUT=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 COLUMNS=200
mkdir -p data/FashionMNIST/raw
for f in .devdata/FashionMNIST/raw/*.gz; do gunzip -c "$f" > "data/FashionMNIST/raw/$(basename "$f" .gz)"; done
{ nvidia-smi -L; nproc; python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name())"; } | tee "$OUT/machine.txt"
timeout "${TEST_SECONDS:-200}" python3 -m pytest -q -p no:cacheprovider -k "not wheel" tests > "$OUT/pytest.log" 2>&1
echo "pytest exit $?"; tail -25 "$OUT/pytest.log"
[ "${ONLY_TESTS:-0}" = 1 ] && exit 0
python3 -m fcclass.cli bench --device cuda --no-keras --images 60000 --repeats 2 --data-root data --json "$OUT/throughput.json" > "$OUT/throughput.txt" 2>&1
echo "bench exit $?"; cat "$OUT/throughput.txt"
python3 -m fcclass.cli bench --mode tta --device cuda --model default --target 0.91 --target 0.92 --target 0.93 --data-root data \
  --json "$OUT/tta.json" > "$OUT/tta.txt" 2>&1
echo "tta exit $?"; cat "$OUT/tta.txt"
