"""One description of a model: GPTConfig declares the architecture and OptimConfig the optimizer, once each; fit,
finetune, the checkpoint and the model folder take every field from there."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from azgpt.model import RECIPES, GPTConfig
from azgpt.train.finetune import AzGPTFinetune
from azgpt.train.module import RECIPE_KEYS, AzGPT
from azgpt.train.optim import FINETUNE_OPTIM, RECIPE_OPTIMIZERS, OptimConfig
from tests.conftest import tiny_fit_args

pytestmark = pytest.mark.filterwarnings("ignore")


def test_fit_and_finetune_take_every_field_with_the_dataclasses_defaults() -> None:
    fit = inspect.signature(AzGPT.__init__).parameters
    finetune = inspect.signature(AzGPTFinetune.__init__).parameters
    assert set(fit) == {"self", "recipe", "compile", *(f.name for f in fields(GPTConfig)),
                        *(f.name for f in fields(OptimConfig))}
    assert set(finetune) == set(fit) - {"recipe"} | {"init_from"}
    for field in fields(GPTConfig):
        assert fit[field.name].default == (None if field.name in RECIPE_KEYS else field.default), field.name
        assert finetune[field.name].default is None, field.name  # the base model's
    for field in fields(OptimConfig):
        assert fit[field.name].default == field.default, field.name
        assert finetune[field.name].default == getattr(FINETUNE_OPTIM, field.name), field.name


def test_every_recipe_names_its_optimizer() -> None:
    assert set(RECIPE_OPTIMIZERS) == set(RECIPES)


def test_bad_settings_are_one_line_naming_the_key() -> None:
    from azgpt.errors import AzGPTError

    with pytest.raises(AzGPTError, match="model: recipe must be one of gpt2, modern, got 'llama3'"):
        AzGPT(recipe="llama3")
    with pytest.raises(AzGPTError, match="model.optimizer must be one of adamw, muon"):
        AzGPT(optimizer="sgd")
    with pytest.raises(TypeError, match="AzGPT\\(\\): got an unexpected keyword argument 'n_layers'"):
        AzGPT(n_layers=2)
    base = Path(__file__).resolve().parents[1] / "fixtures" / "azgpt-0.2.0-tiny.ckpt"
    refusal = r"config \(n_layer: checkpoint 1 vs config 3\): a fine-tune takes its architecture"
    with pytest.raises(AzGPTError, match=refusal):
        AzGPTFinetune(init_from=str(base), n_layer=3, n_embd=32)  # n_embd agrees and is not named


# Run in a fresh interpreter: GPTConfig gains a field before any other part of azgpt is imported, as if it had
# been added to azgpt/model.py and nowhere else.
PROBE = r'''
import contextlib, dataclasses, io, json, sys
from pathlib import Path

import azgpt.model


@dataclasses.dataclass
class ProbedConfig(azgpt.model.GPTConfig):
    probe_width: int = 7


azgpt.model.GPTConfig = ProbedConfig

from azgpt.artifact import load_model
from azgpt.checkpoint import load_checkpoint
from azgpt.cli import main
from azgpt.errors import AzGPTError
from azgpt.train.finetune import AzGPTFinetune
from azgpt.train.module import AzGPT

found = {"fit": main(json.loads(sys.argv[1])) == 0}
run = Path("lightning_logs/version_0")
ckpt = run / "checkpoints" / "last.ckpt"
found["fit config.yaml"] = "probe_width: 3" in (run / "config.yaml").read_text()
found["checkpoint hyper_parameters"] = load_checkpoint(ckpt).raw["hyper_parameters"].get("probe_width")
found["checkpoint"] = load_checkpoint(ckpt).config.probe_width
found["load_from_checkpoint"] = AzGPT.load_from_checkpoint(ckpt).config.probe_width
found["model folder config.json"] = json.loads((run / "model" / "config.json").read_text())["architecture"].get(
    "probe_width")
found["model folder"] = load_model(run / "model").config.probe_width
tuned = AzGPTFinetune(init_from=str(run / "model"))
found["finetune"] = tuned.config.probe_width
found["finetune hyper_parameters"] = tuned.hparams.get("probe_width")
try:
    AzGPTFinetune(init_from=str(run / "model"), probe_width=4)
    found["finetune refuses another value"] = False
except AzGPTError as exc:
    found["finetune refuses another value"] = "probe_width: checkpoint 3 vs config 4" in str(exc)
printed = io.StringIO()
with contextlib.redirect_stdout(printed), contextlib.suppress(SystemExit):  # --print_config exits
    main(["finetune", "--print_config", "--model.init_from", str(run / "model"), "--model.probe_width", "3"])
found["finetune flag"] = "probe_width: 3" in printed.getvalue()
print("FOUND", json.dumps(found))
'''


def test_a_field_added_to_gptconfig_reaches_fit_finetune_the_checkpoint_and_the_model_folder(
        prepared_dir: Path, tmp_path: Path) -> None:
    args = tiny_fit_args(prepared_dir, max_steps=2, **{"--model.probe_width": 3, "--val_every_n_steps": 2})
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(args)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("FOUND "))[6:])
    assert found == {"fit": True, "fit config.yaml": True, "checkpoint hyper_parameters": 3, "checkpoint": 3,
                     "load_from_checkpoint": 3, "model folder config.json": 3, "model folder": 3, "finetune": 3,
                     "finetune hyper_parameters": 3, "finetune refuses another value": True, "finetune flag": True}
