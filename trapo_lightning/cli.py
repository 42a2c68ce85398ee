"""`trapo fit|validate|test --config configs/trapo.yaml`: LightningCLI over `TrapoModule` and `TrapoDataModule`.

Values the data and the model must agree on are linked, not repeated: the data stream's tokenizer comes from
`model.policy`, and the maximum prompt and response lengths from the model.
"""

from __future__ import annotations

import os
import warnings

from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from trapo_lightning.data.datamodule import TrapoDataModule
from trapo_lightning.module import TrapoModule


class TrapoCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.policy", "data.policy")
        parser.link_arguments("model.max_prompt_tokens", "data.max_prompt_tokens")
        parser.link_arguments("model.max_response_tokens", "data.max_response_tokens")


def build_cli(args: list[str] | None = None, run: bool = True) -> TrapoCLI:
    """Parse `args` (default: sys.argv) and, with `run`, execute the subcommand; tests call it in-process."""
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The frozen reference model is in eval mode on purpose; Lightning warns about any module in eval mode.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=UserWarning)
    # Checkpoints are meant to hold the state after each step's update (what a resume continues from).
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization", category=UserWarning)
    return TrapoCLI(
        TrapoModule,
        TrapoDataModule,
        args=args,
        run=run,
        auto_configure_optimizers=False,  # the module builds its optimizer over the policy only
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"parser_mode": "yaml"},
    )


def main() -> None:
    """The `trapo` console script."""
    build_cli()


if __name__ == "__main__":
    main()
