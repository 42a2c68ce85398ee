"""`trapo fit|validate|test --config configs/trapo.yaml`: LightningCLI over `TrapoModule` and `TrapoDataModule`.

Values the data and the model must agree on are linked, not repeated: the data stream's tokenizer comes from
`model.policy`, and the maximum prompt and response lengths from the model.

`trapo plan --config <the training config> [--gpu-memory-gb 80] [--model-config <config.json>]` prints one GPU's
memory during a step of that run, from the model's config.json alone, and exits 0 if it fits, 1 if not
(trapo_lightning/plan.py). It parses the config as `fit` does and builds its components, but not the Trainer.

`trapo export --config <the training config> --ckpt_path <checkpoint> --out <folder>` writes the trained policy as
a plain Hugging Face folder (trapo_lightning/export.py, issue 3). It parses the training config exactly as `fit`
does, overrides included, but builds only `model.policy`: no Trainer, devices or data are touched, so a checkpoint
trained on GPUs exports on a CPU machine.

Errors. A mistake in the user's config, data or paths ends the command with one line, `trapo: error: <message>`,
and exit status 1; with `TRAPO_DEBUG=1` in the environment the traceback is shown instead. User errors are
- `trapo_lightning.errors.UserError`: malformed data rows (`InvalidRecord`, with `file:line`), splits too small,
  files of the wrong kind, missing optional extras, and the config errors below;
- `FileNotFoundError` / `NotADirectoryError`: a path in the config or on the command line (data files, the policy
  folder, a checkpoint, a run folder to plot);
- a `ValueError` raised while the config's classes are built: components check their arguments in `__init__`, so
  such an error is a value the user wrote (it is re-raised as a `ConfigError`), as is Lightning's
  `MisconfigurationException` from building the Trainer, and a `ValueError` from `trapo export` reading the
  checkpoint it was given (a checkpoint of another model, not a Lightning checkpoint).
Anything else, e.g. a KeyError or a ValueError deep in a training step, is a bug and keeps its traceback.
jsonargparse reports unknown keys and wrong types itself, in one line with exit status 2.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from typing import Literal

import yaml
from jsonargparse import ArgumentParser, Namespace, set_parsing_settings
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from trapo_lightning.data.datamodule import TrapoDataModule
from trapo_lightning.errors import ConfigError, UserError
from trapo_lightning.export import export_policy
from trapo_lightning.models.sources import PolicySource
from trapo_lightning.module import TrapoModule
from trapo_lightning.plan import plan_report
from trapo_lightning.plots import main as plot_main


USER_ERRORS = (UserError, FileNotFoundError, NotADirectoryError)
"""What `trapo` reports in one line (see the module docstring); everything else keeps its traceback."""
DEBUG_ENV = "TRAPO_DEBUG"

# The module clips its own gradients (manual optimization); Lightning refuses these with an error about automatic
# optimization that does not say where the setting went.
_MODULE_CLIPS = {
    "gradient_clip_val": "set model.gradient_clip_val instead (global gradient-norm clip, default 1.0, the paper's)",
    "gradient_clip_algorithm": "the module always clips the global gradient norm, at model.gradient_clip_val",
}


# Settings that moved from `model.<key>` into a component (issues 12 and 14): old key -> (component, its name there).
_LOSS = ("model.loss", "trapo_lightning.losses.TrapoLoss")
_EVALUATION = ("model.evaluation", "trapo_lightning.evaluation.EvalProtocol")
MOVED_KEYS = {
    "sft_loss": (_LOSS, "sft"), "trust_region_alpha": (_LOSS, "trust_region_alpha"), "policy_loss": (_LOSS, "policy"),
    "clip_eps_low": (_LOSS, "clip_eps_low"), "clip_eps_high": (_LOSS, "clip_eps_high"),
    "kl_coef": (_LOSS, "kl_coef"), "kl_estimator": (_LOSS, "kl_estimator"), "entropy_coef": (_LOSS, "entropy_coef"),
    "loss_normalizer": (_LOSS, "normalizer"), "val_temperature": (_EVALUATION, "temperature"),
    "val_samples": (_EVALUATION, "samples"), "pass_at_k": (_EVALUATION, "pass_at_k"),
}


class TrapoCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.policy", "data.policy")
        parser.link_arguments("model.max_prompt_tokens", "data.max_prompt_tokens")
        parser.link_arguments("model.max_response_tokens", "data.max_response_tokens")

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        refuse_moved_keys(sys.argv[1:] if args is None else args)
        super().parse_arguments(parser, args)

    def before_instantiate_classes(self) -> None:
        trainer = self._get(self.config, "trainer")
        for key, instead in _MODULE_CLIPS.items():
            if trainer.get(key) is not None:
                raise ConfigError(
                    f"trainer.{key} is not supported: TRAPO optimizes manually and clips its own gradients; {instead}"
                )

    def instantiate_classes(self) -> None:
        with _refused_values_are_config_errors():
            super().instantiate_classes()


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
        with _refused_values_are_config_errors():
            self.policy = _instantiate_policy(self.config.model.policy)


class PlanCLI(TrapoCLI):
    """`trapo plan`: the training config's arguments plus the GPU's memory and where the model's config.json is."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument("--gpu-memory-gb", type=float, default=80.0, help="Memory of one GPU in GiB.")
        parser.add_argument("--model-config", type=str | None, default=None,
                            help="The policy's config.json (or model folder), when model.policy's path is a "
                                 "placeholder: e.g. configs/model_shapes/qwen2.5_math_7b.json.")

    def instantiate_classes(self) -> None:
        # The config's components (weights are loaded only in fit), not the Trainer: no devices are claimed.
        with _refused_values_are_config_errors():
            self.config_init = self.parser.instantiate_classes(self.config)


def refuse_moved_keys(args) -> None:
    """A `ConfigError` naming the new key for any setting still written as `model.<key>` after it moved into a
    component (`MOVED_KEYS`), on the command line or in a `--config` file (jsonargparse alone would only say the
    key is unexpected)."""
    if not isinstance(args, (list, tuple)):
        return
    found: list[tuple[str, str]] = []  # (where, old key)
    for index, arg in enumerate(args):
        name, _, value = str(arg).partition("=")
        if name.startswith("--model.") and name.removeprefix("--model.") in MOVED_KEYS:
            found.append(("the command line", name.removeprefix("--model.")))
        elif name == "--config":
            path = value or (args[index + 1] if index + 1 < len(args) else "")
            found += [(path, key) for key in _moved_keys_in(path)]
    if found:
        where, key = found[0]
        (component, class_path), name = MOVED_KEYS[key]
        raise ConfigError(
            f"model.{key} (in {where}) moved into {component}: write it as {component}.init_args.{name} (with "
            f"{component}.class_path {class_path}); see README's config section and CHANGELOG"
        )


def _moved_keys_in(path: str) -> list[str]:
    """Old loss keys under `model:` in a YAML config file (nothing if it cannot be read: the parser says why)."""
    try:
        with open(path, encoding="utf-8") as handle:
            config = yaml.safe_load(handle)
    except (OSError, yaml.YAMLError):
        return []
    model = config.get("model") if isinstance(config, dict) else None
    return [key for key in MOVED_KEYS if isinstance(model, dict) and key in model]


@contextlib.contextmanager
def _refused_values_are_config_errors():
    """A ValueError while building the config's classes is an argument a component's `__init__` refused, and a
    MisconfigurationException one the Trainer refused (e.g. `accelerator: gpu` on a machine without one)."""
    try:
        yield
    except (ValueError, MisconfigurationException) as error:
        if isinstance(error, UserError):
            raise
        raise ConfigError(str(error)) from error


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
    # `trapo` hands LightningCLI the arguments of its own command line (those after the subcommand it dispatched
    # on), so Lightning's warning against passing `args` besides a command line is about nothing.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended", category=UserWarning)


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
    try:
        folder = export_policy(cli.policy, cli.config.ckpt_path, cli.config.out, cli.config.dtype)
    except ValueError as error:  # the checkpoint given does not fit the config's policy (trapo_lightning/export.py)
        raise ConfigError(str(error)) from error
    print(f"Exported the policy of {cli.config.ckpt_path} to {folder}")
    return str(folder)


def plan_cli(args: list[str]) -> int:
    """`trapo plan` with `args` (what follows `plan`): prints the plan; returns 0 if it fits, 1 if not."""
    _parsing_settings()
    cli = PlanCLI(TrapoModule, TrapoDataModule, args=args, run=False, auto_configure_optimizers=False,
                  parser_kwargs={"parser_mode": "yaml", "prog": "trapo plan",
                                 "description": "Estimate one GPU's memory during a training step of a config."})
    with _refused_values_are_config_errors():
        plan, report = plan_report(cli.config, cli.config_init, cli.config.gpu_memory_gb, cli.config.model_config)
    print(report)
    return 0 if plan.fits else 1


def run_command(argv: list[str]) -> None:
    """`trapo <argv>`: `fit|validate|test ...` (LightningCLI), `export ...`, `plan ...` (exits 1 when the run does
    not fit) or `plot RUN_DIR [RUN_DIR ...]`."""
    if argv[:1] == ["export"]:
        export_cli(argv[1:])
    elif argv[:1] == ["plan"]:
        if plan_cli(argv[1:]):
            raise SystemExit(1)
    elif argv[:1] == ["plot"]:
        plot_main(argv[1:])
    else:
        build_cli(argv)


def main(argv: list[str] | None = None) -> None:
    """The `trapo` console script: `run_command(sys.argv[1:])`, with a user error reported in one line (exit status
    1) unless TRAPO_DEBUG=1 asks for its traceback."""
    try:
        run_command(sys.argv[1:] if argv is None else argv)
    except USER_ERRORS as error:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        print(f"trapo: error: {error} ({DEBUG_ENV}=1 shows the traceback)", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
