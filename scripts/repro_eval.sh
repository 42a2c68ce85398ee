#!/usr/bin/env bash
# Held-out evaluation of the reproduction's runs: avg@8 and pass@1/4/8 (8 answers per problem at temperature 0.6)
# on the 256 held-out problems, for the base model and every method's final checkpoint of each seed given.
#   bash scripts/repro_eval.sh 0 1
set -euo pipefail
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
seeds="${*:-0}"
common=configs/repro/common.yaml
eval=(--model.evaluation.class_path trapo_lightning.evaluation.EvalProtocol --model.evaluation.init_args.samples 8
      --model.evaluation.init_args.pass_at_k "[1, 4, 8]")

# The base model, untrained by any method (no checkpoint: the policy folder itself).
trapo test --config "$common" --config configs/repro/grpo.yaml "${eval[@]}" --trainer.logger.init_args.name base/test

for seed in $seeds; do
  for method in trapo grpo sft luffy trapo_plain_sft sft_then_rl; do
    config="configs/repro/$method.yaml"; run="runs/repro/$method/seed$seed"; name="$method/seed$seed"; extra=()
    if [ "$method" = sft_then_rl ]; then
      name="$name/rl"
      config=configs/repro/grpo.yaml; run="$run/rl"
      extra=(--model.policy.init_args.path "runs/repro/sft_then_rl/seed$seed/sft_model")
    fi
    checkpoint=$(ls "$run"/version_0/checkpoints/*.ckpt | head -n 1)
    trapo test --config "$common" --config "$config" "${extra[@]}" "${eval[@]}" --seed_everything "$seed" \
      --ckpt_path "$checkpoint" --trainer.logger.init_args.name "$name/test"
  done
done
