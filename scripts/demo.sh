#!/usr/bin/env bash
# The main job on the embedded default, end to end:
#   simulate a cohort -> train baselines and the LSTM (MLflow) -> export ONNX -> evaluate on
#   held-out days (accuracy, error grids, interventional check) -> closed-loop trials of MPC
#   and basal-bolus on all 30 virtual patients -> alerts -> reports/demo/index.html
# Sizes come from the environment so the tests can run the same script small:
#   GLUCAST_DEMO_PATIENTS (all), GLUCAST_DEMO_DAYS (14), GLUCAST_DEMO_TRIAL_DAYS (7),
#   GLUCAST_DEMO_EPOCHS (default from training/config.py), GLUCAST_DEMO_OUT (reports/demo)
set -euo pipefail

PATIENTS=${GLUCAST_DEMO_PATIENTS:-all}
DAYS=${GLUCAST_DEMO_DAYS:-14}
TRIAL_DAYS=${GLUCAST_DEMO_TRIAL_DAYS:-7}
OUT=${GLUCAST_DEMO_OUT:-reports/demo}
EPOCHS=${GLUCAST_DEMO_EPOCHS:+--max-epochs $GLUCAST_DEMO_EPOCHS}
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db}
EXP=${GLUCAST_DEMO_EXPERIMENT:-demo}
SEED=1
mkdir -p "$OUT"
START=$(date +%s)
step() { printf '\n\033[1m== [%4ss] %s\033[0m\n' "$(( $(date +%s) - START ))" "$*" >&2; }

step "1/7 simulate $PATIENTS virtual patients x $DAYS days (excitation dosing, Dexcom G6 CGM model)"
glucast simulate --patients "$PATIENTS" --days "$DAYS" --policy excitation --seed $SEED \
  --out "$OUT/cohort.parquet" --json > "$OUT/simulate.json"

step "2/7 baselines: persistence, linear trend, ridge, physiological (fit on train days, scored on held-out days)"
for m in persistence linear ridge physio; do
  glucast train --model $m --data "$OUT/cohort.parquet" --experiment "$EXP" \
    --out "$OUT/models/$m" --json > "$OUT/train_$m.json"
done

step "3/7 train the LSTM with Lightning, calibrate its interval, export ONNX + manifest, log to MLflow"
# shellcheck disable=SC2086
glucast train --model lstm --data "$OUT/cohort.parquet" --experiment "$EXP" $EPOCHS \
  --out "$OUT/models/lstm" --json > "$OUT/train_lstm.json"

step "4/7 evaluate the exported ONNX model on held-out days (+ interventional re-simulation) and the forecast ceilings"
# logged as a child run of the LSTM's training run (found from the model's manifest)
glucast evaluate --model "$OUT/models/lstm/model" --data "$OUT/cohort.parquet" --interventional \
  --mlflow --experiment "$EXP" --json > "$OUT/evaluate_lstm.json"
# the forecast ceilings on the same test windows (issue: how good could any forecaster be?)
for oracle in oracle-noise oracle-filter; do
  glucast evaluate --model $oracle --data "$OUT/cohort.parquet" --mlflow --experiment "$EXP" \
    --json > "$OUT/evaluate_${oracle//-/_}.json"
done
# this run's test data only: an mlflow.db kept from an earlier demo (older simulator or sensor)
# holds runs on other test windows, which compare refuses to put side by side
HASH=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['dataset_hash'])" \
  "$OUT/train_lstm.json")
glucast compare --experiment "$EXP" --latest --dataset-hash "$HASH" --plot "$OUT/compare.png" \
  --json > "$OUT/compare.json"

step "5/7 closed-loop trials, $TRIAL_DAYS days, random meals announced with 20% carb error, then unannounced"
glucast trial --controller basal-bolus --patients "$PATIENTS" --days "$TRIAL_DAYS" --seed $SEED \
  --carb-error 0.2 --report "$OUT/trial-basal-bolus" --mlflow --experiment "$EXP" --json \
  > "$OUT/trial_basal-bolus.json"
glucast trial --controller mpc --model "$OUT/models/lstm/model" --patients "$PATIENTS" \
  --days "$TRIAL_DAYS" --seed $SEED --carb-error 0.2 --report "$OUT/trial-mpc" --mlflow \
  --experiment "$EXP" --json > "$OUT/trial_mpc.json"
# the same meals, never announced: the MPC must find them in the CGM (unannounced-meal detection)
glucast trial --controller mpc --model "$OUT/models/lstm/model" --patients "$PATIENTS" \
  --days "$TRIAL_DAYS" --seed $SEED --unannounced --report "$OUT/trial-mpc-unannounced" --mlflow \
  --experiment "$EXP" --json > "$OUT/trial_mpc-unannounced.json"

step "6/7 predicted-low alerts vs threshold alerts on held-out days"
glucast alerts evaluate --model "$OUT/models/lstm/model" --data "$OUT/cohort.parquet" --json \
  --mlflow --experiment "$EXP" > "$OUT/alerts.json"
glucast alerts evaluate --model "$OUT/models/lstm/model" --data "$OUT/cohort.parquet" --json \
  --sweep 0.25,0.3,0.35,0.4,0.45,0.5 --max-false-per-day 1 --plot "$OUT/alerts_tradeoff.png" \
  --mlflow --experiment "$EXP" > "$OUT/alerts_sweep.json"

step "7/7 the report"
python scripts/demo_report.py "$OUT"

step "done"
cat >&2 <<MSG

  Report:  $OUT/index.html   (open it in a browser: xdg-open $OUT/index.html)
  MLflow:  .venv/bin/mlflow ui --backend-store-uri $MLFLOW_TRACKING_URI
           then $(python -c "import json,sys; from training.tracking import experiment_url as u
print(u(json.load(open(sys.argv[1]))['experiment_id']))" "$OUT/train_lstm.json")
           (experiment "$EXP"; the report links to every run)
MSG
