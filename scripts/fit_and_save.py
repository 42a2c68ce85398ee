"""Run `trapo fit` and save the trained policy with its tokenizer as a Hugging Face folder.

    python scripts/fit_and_save.py --out runs/repro/base --config configs/repro/base_sft.yaml
    python scripts/fit_and_save.py --out DIR --config A.yaml --config B.yaml [any other trapo fit arguments]

The folder loads back through `trapo_lightning.models.PretrainedFolder` (and `from_pretrained`), which is how a
run starts from another run's result: the reproduction's base model, and the RL stage of SFT-then-RL.
"""

from __future__ import annotations

import argparse

from trapo_lightning.cli import build_cli


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to write the trained policy and tokenizer to")
    args, fit_args = parser.parse_known_args()
    cli = build_cli(["fit", *fit_args])
    cli.model.policy.save_pretrained(args.out)
    cli.model.tokenizer.save_pretrained(args.out)
    print(f"policy written to {args.out}")


if __name__ == "__main__":
    main()
