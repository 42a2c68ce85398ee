#!/usr/bin/env bash
# The small-scale reproduction (docs/results.md): the base model, then every method from it, for each seed given.
#   bash scripts/repro.sh 0 1 2        (default: seed 0)
# Logs: runs/repro/<method>/seed<S>/version_0/metrics.csv; the last checkpoint sits next to it in checkpoints/.
set -euo pipefail
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # one thread: on 2 shared cores two threads can be 10x slower
seeds="${*:-0}"
common=configs/repro/common.yaml

[ -f runs/repro/base/config.json ] || python scripts/fit_and_save.py --out runs/repro/base --config configs/repro/base_sft.yaml

for seed in $seeds; do
  run=(--seed_everything "$seed" --data.seed "$seed")
  for method in trapo grpo sft luffy trapo_plain_sft; do
    trapo fit --config "$common" --config "configs/repro/$method.yaml" "${run[@]}" \
      --trainer.logger.init_args.name "$method/seed$seed"
  done
  # SFT-then-RL in the same budget: 75 steps of SFT, saved as a model folder, then 75 steps of GRPO from it.
  python scripts/fit_and_save.py --out "runs/repro/sft_then_rl/seed$seed/sft_model" \
    --config "$common" --config configs/repro/sft.yaml "${run[@]}" --trainer.max_steps 75 \
    --trainer.logger.init_args.name "sft_then_rl/seed$seed/sft"
  trapo fit --config "$common" --config configs/repro/grpo.yaml "${run[@]}" --trainer.max_steps 75 \
    --model.policy.init_args.path "runs/repro/sft_then_rl/seed$seed/sft_model" \
    --trainer.logger.init_args.name "sft_then_rl/seed$seed/rl"
done
