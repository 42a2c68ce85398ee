"""Run `trapo fit` and save the trained policy with its tokenizer as a Hugging Face folder.

    python scripts/fit_and_save.py --out runs/repro/base --config configs/repro/base_sft.yaml
    python scripts/fit_and_save.py --out DIR --config A.yaml --config B.yaml [any other trapo fit arguments]
    python scripts/fit_and_save.py --best --out DIR ...   (the best monitored checkpoint, not the last weights)

The folder loads back through `trapo_lightning.models.PretrainedFolder` (and `from_pretrained`), which is how a
run starts from another run's result: the reproduction's base model, and the RL stage of SFT-then-RL. `--best`
needs a `ModelCheckpoint` with a `monitor` in the config (configs/repro/sft_stage.yaml: the lowest held-out SFT
loss); its best checkpoint is exported with `trapo export`'s code.
"""

from __future__ import annotations

import argparse

from trapo_lightning.cli import build_cli
from trapo_lightning.export import export_policy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to write the trained policy and tokenizer to")
    parser.add_argument("--best", action="store_true", help="save the best monitored checkpoint's policy")
    args, fit_args = parser.parse_known_args()
    cli = build_cli(["fit", *fit_args])
    if args.best:
        checkpoint = cli.trainer.checkpoint_callback
        if checkpoint is None or checkpoint.monitor is None or not checkpoint.best_model_path:
            raise SystemExit("--best needs a ModelCheckpoint with a `monitor` in trainer.callbacks (none saved)")
        export_policy(cli.model.policy_source, checkpoint.best_model_path, args.out)
        print(f"best checkpoint ({checkpoint.monitor} = {float(checkpoint.best_model_score):.4f}): "
              f"{checkpoint.best_model_path}")
    else:
        cli.model.policy.save_pretrained(args.out)
        cli.model.tokenizer.save_pretrained(args.out)
    print(f"policy written to {args.out}")


if __name__ == "__main__":
    main()
