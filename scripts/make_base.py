"""Make the small-scale reproduction's base model: brief plain SFT on the easy slice, saved as a HF folder.

    python scripts/make_base.py [--out runs/repro/base] [extra trapo fit arguments]

Runs `configs/repro/base_sft.yaml` (SFTOnly guidance: one expert trace per prompt, nothing sampled) and writes the
trained policy with its tokenizer through `save_pretrained`, so every method of the reproduction starts from the
same folder via `trapo_lightning.models.PretrainedFolder`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from trapo_lightning.cli import build_cli

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "repro" / "base_sft.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/repro/base", help="folder to write the base model to")
    args, fit_args = parser.parse_known_args()
    cli = build_cli(["fit", "--config", str(CONFIG), *fit_args])
    cli.model.policy.save_pretrained(args.out)
    cli.model.tokenizer.save_pretrained(args.out)
    print(f"base model written to {args.out}")


if __name__ == "__main__":
    main()
