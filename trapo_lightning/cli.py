"""`trapo fit|validate|test --config configs/trapo.yaml`: LightningCLI over `TrapoModule` and `TrapoDataModule`.

Values the data and the model must agree on are linked, not repeated: the data stream's tokenizer comes from
`model.policy`, and the maximum prompt and response lengths from the model.

`trapo export --config <the training config> --ckpt_path <checkpoint> --out <folder>` writes the trained policy as
a plain Hugging Face folder (trapo_lightning/export.py, issue 3). It parses the training config exactly as `fit`
does, overrides included, but builds only `model.policy`: no Trainer, devices or data are touched, so a checkpoint
trained on GPUs exports on a CPU machine.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Literal

from jsonargparse import ArgumentParser, Namespace, set_parsing_settings
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from trapo_lightning.data.datamodule import TrapoDataModule
from trapo_lightning.export import export_policy
from trapo_lightning.models.sources import PolicySource
from trapo_lightning.module import TrapoModule
from trapo_lightning.plots import main as plot_main


class TrapoCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.policy", "data.policy")
        parser.link_arguments("model.max_prompt_tokens", "data.max_prompt_tokens")
        parser.link_arguments("model.max_response_tokens", "data.max_response_tokens")


class ExportCLI(TrapoCLI):
    """`trapo export`: the training config's arguments plus where the checkpoint is and where to write."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument("--ckpt_path", type=str, required=True,
                            help="Checkpoint to export: a .ckpt file or a sharded checkpoint folder (FSDP2).")
        parser.add_argument("--out", type=str, required=True, help="Folder to write the Hugging Face model to.")
        parser.add_argument("--dtype", type=Literal["float32", "bfloat16", "float16"] | None, default=None,
                            help="Dtype of the saved weights (default: the dtype they were trained in).")
        # A run's saved config.yaml also holds `fit`'s own arguments; export always loads with weights_only=True.
        parser.add_argument("--weights_only", type=bool | None, default=None,
                            help="Ignored (accepted so that a run's saved config.yaml parses).")

    def instantiate_classes(self) -> None:
        # Only the policy source: the architecture and tokenizer come from it, the weights from the checkpoint.
        self.policy = _instantiate_policy(self.config.model.policy)


def _instantiate_policy(spec: Namespace) -> PolicySource:
    parser = ArgumentParser()
    parser.add_argument("--policy", type=PolicySource)
    return parser.instantiate_classes(parser.parse_object({"policy": spec})).policy


def _parsing_settings() -> None:
    """Settings shared by every `trapo` subcommand."""
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The frozen reference model is in eval mode on purpose; Lightning warns about any module in eval mode.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=UserWarning)
    # Checkpoints are meant to hold the state after each step's update (what a resume continues from).
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization", category=UserWarning)


def build_cli(args: list[str] | None = None, run: bool = True) -> TrapoCLI:
    """Parse `args` (default: sys.argv) and, with `run`, execute the subcommand; tests call it in-process."""
    _parsing_settings()
    return TrapoCLI(
        TrapoModule,
        TrapoDataModule,
        args=args,
        run=run,
        auto_configure_optimizers=False,  # the module builds its optimizer over the policy only
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"parser_mode": "yaml"},
    )


def export_cli(args: list[str]) -> str:
    """`trapo export` with `args` (what follows `export`); returns the folder written. Tests call it in-process."""
    _parsing_settings()
    cli = ExportCLI(
        TrapoModule,
        TrapoDataModule,
        args=args,
        run=False,
        auto_configure_optimizers=False,
        parser_kwargs={"parser_mode": "yaml", "prog": "trapo export",
                       "description": "Write a trained policy checkpoint as a Hugging Face model folder."},
    )
    folder = export_policy(cli.policy, cli.config.ckpt_path, cli.config.out, cli.config.dtype)
    print(f"Exported the policy of {cli.config.ckpt_path} to {folder}")
    return str(folder)


def main() -> None:
    """The `trapo` console script: `trapo fit|validate|test ...` (LightningCLI), `trapo export ...` and
    `trapo plot RUN_DIR [RUN_DIR ...]`."""
    if sys.argv[1:2] == ["export"]:
        export_cli(sys.argv[2:])
        return
    if sys.argv[1:2] == ["plot"]:
        plot_main(sys.argv[2:])
        return
    build_cli()


if __name__ == "__main__":
    main()
