#!/usr/bin/env bash
# The main job on the embedded default. Grows as capabilities land (issue 7).
set -euo pipefail
mkdir -p reports/demo
echo "== glucast demo: ingest the shipped ShanghaiT1DM sample =="
glucast data ingest tests/fixtures/shanghai/*.xls* --format shanghai --out reports/demo/shanghai.parquet
glucast data describe reports/demo/shanghai.parquet
