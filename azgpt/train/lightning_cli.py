"""LightningCLI over AzGPT and AzGPTDataModule: ``fit``, ``validate`` and ``test`` from YAML configs."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from azgpt.argv import list_flags, list_parameters
from azgpt.data.datamodule import AzGPTDataModule
from azgpt.errors import AzGPTError
from azgpt.train.resume import checkpoint_folders, resolve_checkpoint
from azgpt.train.loggers import run_dir
from azgpt.train.module import (AzGPT, changed_training_settings, check_same_architecture, kept_from_checkpoint,
                                with_recipe)
from azgpt.train.time_budget import TimeBudget, parse_budget
from azgpt.train.trainer import choose_precision, with_azgpt_defaults

_PACKAGE_DIR = Path(__file__).resolve().parent.parent
# Installed from a wheel, the configs are the package azgpt.configs; in a clone they sit beside azgpt/.
CONFIG_DIR = next((d for d in (_PACKAGE_DIR / "configs", _PACKAGE_DIR.parent / "configs") if d.is_dir()),
                  _PACKAGE_DIR / "configs")


def resolve_config_path(name: str) -> str:
    """A config named on the command line: as given, else under ./configs/, else under azgpt's configs/."""
    for candidate in (Path(name), Path("configs") / name, CONFIG_DIR / name):
        if candidate.is_file():
            return str(candidate)
    raise AzGPTError(f"config file {name} not found (looked in ., ./configs and {CONFIG_DIR}); "
                     f"available: {', '.join(sorted(p.name for p in CONFIG_DIR.glob('*.yaml')))}")


def resolve_config_arguments(argv: list[str]) -> list[str]:
    """Rewrite every ``--config NAME`` / ``--config=NAME`` so bare names find the shipped configs."""
    resolved: list[str] = []
    expect_path = False
    for arg in argv:
        if expect_path:
            resolved.append(resolve_config_path(arg))
            expect_path = False
        elif arg in ("--config", "-c"):
            resolved.append(arg)
            expect_path = True
        elif arg.startswith("--config="):
            resolved.append("--config=" + resolve_config_path(arg.split("=", 1)[1]))
        else:
            resolved.append(arg)
    return resolved


class RunFolderConfig(SaveConfigCallback):
    """LightningCLI's ``config.yaml``, written into the run's own folder whatever the logger.

    Lightning writes it to ``trainer.log_dir``, which under W&B is the ``save_dir`` every run shares (the current
    folder), so each run overwrote the last's and ``azgpt report`` could not tell a run's data. Here it goes
    beside the run's checkpoints and report (``azgpt.train.loggers.run_dir``).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{**kwargs, "save_to_log_dir": False})

    def save_config(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        # Rank zero only (Lightning calls it there): no trainer.log_dir, whose broadcast the other ranks would miss.
        folder = run_dir(trainer) or Path(trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        self.parser.save(self.config, str(folder / self.config_filename), skip_none=False, overwrite=True,
                         multifile=self.multifile)


class AzGPTCLI(LightningCLI):
    """Links the data's vocabulary and block size into the model and counts validation in optimizer steps.

    It also makes runs resumable: ``--ckpt_path`` (a file, or ``last``) is checked and resolved before
    anything loads it, checkpoints load with ``weights_only=True``, are written atomically
    (``AtomicCheckpointIO``), and SIGTERM / SIGINT stop at a step boundary with a checkpoint (``GracefulStop``).
    """

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand not in ("fit", "validate", "test"):
            return
        config = self.config[subcommand]
        if config.get("weights_only") is False:
            raise AzGPTError("--weights_only false is not supported: azgpt checkpoints hold only tensors and plain "
                             "values, and loading anything else could run code hidden in the file")
        config.weights_only = True
        if config.get("ckpt_path"):
            # Before LightningCLI itself opens the file (for its hyperparameters) and before fit() does.
            trainer = config.trainer.as_dict() if hasattr(config.trainer, "as_dict") else dict(config.trainer)
            config.ckpt_path = resolve_checkpoint(str(config.ckpt_path), checkpoint_folders(trainer))
            # LightningCLI then replaces the model's settings with the checkpoint's hyperparameters; what the user
            # asked for is kept here and compared in before_instantiate_classes.
            self._model_asked_for = dict(vars(config.model))

    links = (("data.vocab_size", "model.vocab_size"), ("data.block_size", "model.block_size"))

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for source, target, *when in self.links:  # (source, target[, "parse" or "instantiate"])
            parser.link_arguments(source, target, apply_on=when[0] if when else "parse")
        parser.add_argument("--val_every_n_steps", type=int | None, default=None,
                            help="Validate every N optimizer steps (sets trainer.val_check_interval to "
                                 "N * accumulate_grad_batches, since Lightning counts micro-batches).")
        parser.add_argument("--early_stopping", type=int | None, default=None,
                            help="Stop when val_loss has not improved for this many validations "
                                 "(Lightning's EarlyStopping; null: never stop early).")
        parser.add_argument("--budget", type=str | None, default=None,
                            help="Train for this long instead of trainer.max_steps (e.g. 30min, 90s, 1.5h, "
                                 "1h30min): azgpt measures its speed, plans the steps that end on time and "
                                 "re-plans if the speed changes (azgpt.train.time_budget; null: max_steps).")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        asked_for = getattr(self, "_model_asked_for", None)
        if asked_for is not None:  # refuse rather than silently drop an architecture the user asked for
            saved = dict(vars(config.model))
            check_same_architecture(with_recipe(saved), with_recipe(kept_from_checkpoint(asked_for, saved)))
            changed = changed_training_settings(saved, asked_for)
            if changed:  # kept so that the run goes on exactly as it started, but never silently
                rank_zero_warn(f"azgpt: a resumed run keeps the checkpoint's training settings, so these from the "
                               f"config or command line are not used: model.{', model.'.join(changed)}")
        trainer = config.trainer
        check_gpu_present(trainer.accelerator, config.get("config") or [])
        trainer.precision = choose_precision(trainer.accelerator, trainer.precision)
        every = config.get("val_every_n_steps")
        if every is not None:
            if every < 1:
                raise AzGPTError(f"val_every_n_steps must be a positive integer, got {every}")
            trainer.val_check_interval = every * (trainer.accumulate_grad_batches or 1)
            trainer.check_val_every_n_epoch = None
        patience = config.get("early_stopping")
        if patience is not None and (isinstance(patience, bool) or patience < 1):
            raise AzGPTError(f"early_stopping must be a positive number of validations or null, got {patience}")
        if config.get("budget") is not None:
            parse_budget(config.budget)  # a bad duration fails here, before any work

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ModuleNotFoundError, ValueError) as exc:  # e.g. a logger whose package is missing
            own = _azgpt_cause(exc)  # a callback's own check, wrapped by jsonargparse in a ValueError
            if own is not None:
                raise own from None
            missing = exc
            while missing is not None and not isinstance(missing, ModuleNotFoundError):
                if type(missing).__name__ == "MlflowException":  # e.g. its file: store refused without opt-in
                    raise AzGPTError(f"MLflow: {str(missing).splitlines()[0]}") from None
                missing = missing.__cause__ or missing.__context__  # jsonargparse wraps it in a ValueError
            if missing is None:
                raise
            extra = next((name for name in ("wandb", "mlflow") if name in str(missing)), None)
            hint = f"pip install 'azgpt[{extra}]'" if extra else "install the package it names"
            raise AzGPTError(f"{missing}; for azgpt: {hint}") from None

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The Trainer ``build_trainer`` would make: azgpt's plugins and callbacks unless the config has its own."""
        trainer = self.config_init[self.subcommand]["trainer"] if self.subcommand else self.config_init["trainer"]
        defaults = with_azgpt_defaults({key: trainer.get(key) for key in ("plugins", "callbacks", "logger",
                                                                          "enable_progress_bar",
                                                                          "enable_checkpointing")})
        kwargs.setdefault("plugins", defaults["plugins"])
        callbacks = defaults["callbacks"]
        patience = self.config[self.subcommand].get("early_stopping") if self.subcommand else None
        budget = self.config[self.subcommand].get("budget") if self.subcommand else None
        if patience is not None and self.subcommand == "fit" and budget is not None:
            # Measured: laptop.yaml's val_loss sat still for 3 validations at the peak rate and early stopping ended
            # the run at 58% of its budget, before the cooldown that brings most of the gain.
            rank_zero_info(f"azgpt: budget {budget}: early_stopping {patience} is off; the learning rate stays at "
                           f"its peak until the cooldown at the end, where val_loss falls most, and the budget ends "
                           f"the run")
        elif patience is not None and self.subcommand == "fit":
            # Checked after each validation only: a run whose steps end before the first one has nothing to check.
            callbacks = [*callbacks, EarlyStopping(monitor="val_loss", mode="min", patience=patience,
                                                   check_on_train_epoch_end=False)]
        if budget is not None and self.subcommand == "fit":
            callbacks = [*callbacks, TimeBudget(budget)]
        kwargs.setdefault("callbacks", callbacks)
        return super().instantiate_trainer(**kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit, validate and test; not predict, which has nothing to predict on (no predict data)."""
        return {name: keys for name, keys in LightningCLI.subcommands().items() if name != "predict"}


def check_gpu_present(accelerator: object, config_files: list) -> None:
    """Refuse, in one line naming the config that asks, a GPU accelerator on a machine with none (Lightning
    would stop with a traceback: "No supported gpu backend found!")."""
    if accelerator not in ("gpu", "cuda") or torch.cuda.is_available():
        return
    if accelerator == "gpu" and torch.backends.mps.is_available():
        return
    asking = [str(path) for path in config_files if _sets_accelerator(path)]
    source = f" (set by {asking[-1]})" if asking else ""
    raise AzGPTError(f"trainer.accelerator is {accelerator}{source} but torch finds no GPU on this machine: run "
                     f"without that config, or to try DDP on CPUs add --trainer.accelerator cpu --trainer.devices 2")


def _sets_accelerator(path: object) -> bool:
    try:
        content = yaml.safe_load(Path(str(path)).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return False
    trainer = content.get("trainer") if isinstance(content, dict) else None
    return isinstance(trainer, dict) and trainer.get("accelerator") in ("gpu", "cuda")


def _azgpt_cause(exc: BaseException) -> AzGPTError | None:
    """The first ``AzGPTError`` in ``exc``'s chain of causes, if any."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, AzGPTError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def run_lightning_cli(argv: list[str], cli_class: type[AzGPTCLI] = AzGPTCLI, model_class: type = AzGPT,
                      datamodule_class: type = AzGPTDataModule) -> AzGPTCLI:
    """Run ``fit`` / ``validate`` / ``test`` (and ``--help`` / ``--print_config``) as on the command line."""
    # LightningCLI reads sys.argv (and DDP re-launches the script from it), so the resolved arguments go
    # there rather than into `args=`, which would warn that both are set.
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # torch-internal noise raised inside Lightning
    # Mixed precision keeps fp32 weights, so the summary's fallback to 32 bits gives the right size anyway.
    warnings.filterwarnings("ignore", message=".*is not supported by the model summary.*")
    saved_argv = sys.argv
    lists = list_parameters(model_class, "--model.") | list_parameters(datamodule_class, "--data.")
    argv = list_flags(resolve_config_arguments(argv), {name.removeprefix("--") for name in lists})
    sys.argv = [saved_argv[0] if saved_argv else "azgpt", *argv]
    try:
        return cli_class(model_class, datamodule_class, seed_everything_default=1337,
                         save_config_callback=RunFolderConfig, save_config_kwargs={"overwrite": True})
    finally:
        sys.argv = saved_argv
