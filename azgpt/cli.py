"""The ``azgpt`` command: one surface for every verb, in LightningCLI's flag style.

    azgpt prepare --corpus corpus.txt.gz --out data/mine
    azgpt fit --config quickstart.yaml
    azgpt generate --ckpt lightning_logs/version_0/checkpoints/last.ckpt --prompt "Azərbaycan"
    azgpt export --ckpt lightning_logs/version_0/checkpoints/last.ckpt --out azgpt-hf

``fit`` / ``validate`` / ``test`` are LightningCLI's (azgpt/train/lightning_cli.py). Every other verb is a
typed Python function with a Google-style docstring, listed in ``VERBS``; jsonargparse (which LightningCLI is
built on) turns its parameters into ``--snake_case`` flags and adds ``--config`` and ``--print_config``. A
function whose one parameter is a dataclass gets that dataclass's fields as flags. A user's mistake ends in one
line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
import signal
import sys
from dataclasses import dataclass
from typing import Any, Callable, get_type_hints

from azgpt import __version__
from azgpt.errors import AzGPTError, TrainingInterrupted
from azgpt.argv import is_list, list_flags
from azgpt.runtime import tune_malloc

EXIT_USER_ERROR = 2
EXIT_CTRL_C = 128 + signal.SIGINT


@dataclass(frozen=True)
class Verb:
    """A command of ``azgpt``: where its function lives and one line for ``azgpt --help``."""

    target: str  # "module:function"; empty for LightningCLI's own verbs
    summary: str
    raw_argv: bool = False  # a LightningCLI of its own: the function takes the arguments as they are

    def load(self) -> Callable[..., int]:
        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(module), name)


LIGHTNING = ""  # target of the verbs LightningCLI runs
VERBS: dict[str, Verb] = {
    "prepare": Verb("azgpt.data.prepare:prepare_command",
                    "train a BPE tokenizer on a corpus and write train/val token files"),
    "corpora": Verb("azgpt.data.hub:corpora_command", "the Azerbaijani corpora known by name: size, licence, source"),
    "fit": Verb(LIGHTNING, "train a model (LightningCLI: --config quickstart.yaml, --ckpt_path last to resume)"),
    "validate": Verb(LIGHTNING, "validation loss, perplexity and bits per byte of a checkpoint"),
    "test": Verb(LIGHTNING, "the same metrics as validate, logged as a test run"),
    "generate": Verb("azgpt.use.generate:generate_command", "continue a prompt with a trained model"),
    "evaluate": Verb("azgpt.use.evaluate:evaluate_command",
                     "loss, perplexity and bits per byte of a checkpoint on any text, per file"),
    "export": Verb("azgpt.use.export:export_command",
                   "write a checkpoint as a Hugging Face folder (GPT-2 or Llama) or a GGUF file"),
    "report": Verb("azgpt.train.report:report_command", "write report.png and report.md into a run's folder"),
    "finetune": Verb("azgpt.train.finetune:run_finetune_cli", "fine-tune a checkpoint on instruction jsonl "
                     "(LightningCLI like fit: --config finetune.yaml --model.init_from CKPT)", raw_argv=True),
    "chat": Verb("azgpt.use.chat:chat_command", "talk with a model in the terminal (its chat template if fine-tuned)"),
}


def usage() -> str:
    width = max(len(name) for name in VERBS)
    lines = [f"azgpt {__version__}: train a GPT on Azerbaijani text from scratch, then use it.", "",
             "usage: azgpt VERB [--config FILE] [options]   (azgpt VERB --help for a verb's options)", "",
             "verbs:"]
    lines += [f"  {name:<{width}}  {verb.summary}" for name, verb in VERBS.items()]
    lines += ["", "  --version  print the version and exit"]
    return "\n".join(lines)


# -- verbs defined by a Python function ---------------------------------------------------------------

_KEBAB_FLAG = re.compile(r"^--([a-z0-9]+(?:-[a-z0-9]+)+)(=.*)?$")


def snake_case_flags(argv: list[str], verb: str) -> list[str]:
    """``--max-new-tokens`` -> ``--max_new_tokens``: the spelling before azgpt 0.2, kept for one release."""
    converted = []
    for arg in argv:
        match = _KEBAB_FLAG.match(arg)
        if match:
            new = "--" + match.group(1).replace("-", "_")
            print(f"azgpt {verb}: note: {arg.split('=', 1)[0]} is now spelled {new} (the old spelling goes away "
                  f"in the next release)", file=sys.stderr)
            arg = new + (match.group(2) or "")
        converted.append(arg)
    return converted


def bare_bool_flags(argv: list[str], names: set[str]) -> list[str]:
    """``--overwrite`` alone means ``--overwrite true`` (jsonargparse wants a value for booleans)."""
    completed = []
    for i, arg in enumerate(argv):
        completed.append(arg)
        if arg.startswith("--") and arg[2:] in names and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            completed.append("true")
    return completed


def _options_of_type(function: Callable[..., Any], wanted: Callable[[Any], bool]) -> set[str]:
    hints = get_type_hints(_options_class(function) or function)
    return {name for name, hint in hints.items() if name != "return" and wanted(hint)}


def _options_class(function: Callable[..., Any]) -> type | None:
    """The dataclass of a function taking exactly one dataclass parameter, else None."""
    parameters = list(inspect.signature(function).parameters.values())
    if len(parameters) != 1:
        return None
    annotation = get_type_hints(function).get(parameters[0].name)
    return annotation if dataclasses.is_dataclass(annotation) else None


def build_parser(name: str, function: Callable[..., Any]):
    """A jsonargparse parser for ``function``'s parameters, with ``--config`` and ``--print_config``."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    doc = inspect.getdoc(function) or ""
    options = _options_class(function)
    description = (inspect.getdoc(options) if options else doc).split("\n\n")[0]
    parser = ArgumentParser(prog=f"azgpt {name}", description=description, exit_on_error=True)
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="a YAML file of these options")
    if options is not None:
        parser.add_class_arguments(options, fail_untyped=True, sub_configs=True)
    else:
        # A verb may take its required parameters as positionals (``azgpt report RUN_DIR``).
        parser.add_function_arguments(function, fail_untyped=True,
                                      as_positional=getattr(function, "positional", False))
    return parser


def run_verb(name: str, argv: list[str]) -> int:
    """Parse ``argv`` for the function behind ``name`` and call it."""
    function = VERBS[name].load()
    parser = build_parser(name, function)
    argv = snake_case_flags(argv, name)
    argv = bare_bool_flags(argv, _options_of_type(function, lambda hint: hint is bool))
    argv = list_flags(argv, _options_of_type(function, is_list))
    try:
        config = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --print_config, or a parse error jsonargparse has already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USER_ERROR
    values = {key: value for key, value in vars(config).items() if key not in ("config", "__path__")}
    options = _options_class(function)
    if options is not None:
        return function(options(**values))
    return function(**values)


# -- fit / validate / test ----------------------------------------------------------------------------


def run_training(argv: list[str], runner: Callable[[list[str]], Any] | None = None) -> int:
    """Run a LightningCLI (``runner``; default fit/validate/test's) on ``argv``: exit 0, or 143 after SIGTERM."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from azgpt.train.lightning_cli import run_lightning_cli

    try:
        (runner or run_lightning_cli)(argv)
    except SIGTERMException:  # Lightning's own stop (outside the training loop), which would exit 0
        print("azgpt: stopped by SIGTERM outside the training loop; no checkpoint was written", file=sys.stderr)
        return 128 + signal.SIGTERM
    except SystemExit as exc:
        # Lightning ends a run stopped by Ctrl-C (KeyboardInterrupt) with sys.exit(1); the shell's code is 130.
        if exc.code == 1 and isinstance(exc.__context__, KeyboardInterrupt):
            print("azgpt: stopped at once by Ctrl-C; the step under way was not saved (--ckpt_path last resumes "
                  "from the last checkpoint written)", file=sys.stderr)
            return EXIT_CTRL_C
        raise
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``azgpt`` and ``python -m azgpt.cli``."""
    tune_malloc()  # process-wide malloc settings, see azgpt/runtime.py; AZGPT_NO_TUNING=1 opts out
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else EXIT_USER_ERROR
    if argv[0] in ("--version", "-V", "version"):
        print(f"azgpt {__version__}")
        return 0
    name = argv[0]
    if name not in VERBS:
        print(f"azgpt: error: unknown verb {name!r}; the verbs are {', '.join(VERBS)} (azgpt --help)",
              file=sys.stderr)
        return EXIT_USER_ERROR
    try:
        if VERBS[name].target == LIGHTNING:
            return run_training(argv)
        if VERBS[name].raw_argv:
            return run_training(argv[1:], runner=VERBS[name].load())
        return run_verb(name, argv[1:])
    except TrainingInterrupted as exc:
        print(f"azgpt: {exc}", file=sys.stderr)
        return exc.exit_code
    except AzGPTError as exc:
        print(f"azgpt: error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("azgpt: stopped by Ctrl-C", file=sys.stderr)
        return EXIT_CTRL_C


if __name__ == "__main__":
    sys.exit(main())
