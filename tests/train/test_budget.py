"""The data budget printed when fit starts: its arithmetic, its TensorBoard text, and its warning."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import yaml

from azgpt.cli import main
from azgpt.data.datamodule import AzGPTDataModule
from azgpt.train.budget import DataBudget, DataBudgetCheck, budget_of
from azgpt.train.lightning_cli import CONFIG_DIR
from azgpt.train.module import AzGPT
from tests.conftest import tiny_fit_args


def test_budget_arithmetic() -> None:
    budget = DataBudget(train_tokens=100_000, max_steps=50, effective_batch=8, block_size=32, parameters=6_400)
    assert budget.consumed_tokens == 50 * 8 * 32 == 12_800
    assert budget.epochs == pytest.approx(0.128)
    assert budget.tokens_per_parameter == pytest.approx(2.0)
    assert budget.warning(10) is None
    many = DataBudget(train_tokens=1_000, max_steps=50, effective_batch=8, block_size=32, parameters=6_400)
    message = many.warning(10)
    assert "12.8" not in message and "13 times over" in message and "trainer.max_steps to about 39" in message


def test_fit_states_the_budget_of_a_small_config(prepared_dir: Path, tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.chdir(tmp_path)
    with caplog.at_level("INFO"):
        assert main(tiny_fit_args(prepared_dir, max_steps=6)) == 0  # micro-batch 4 x accumulation 2, block 32
    text = caplog.text
    train_tokens = len(np.load(prepared_dir / "train.npy", mmap_mode="r"))
    assert f"train tokens: {train_tokens:,}" in text
    assert "tokens this run consumes: 1,536 = 6 steps x 8 sequences x 32 tokens" in text
    assert f"epochs: {1536 / train_tokens:,.2f}" in text
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "lightning_logs" / "version_0"), size_guidance={"tensors": 0}).Reload()
    assert "data_budget/text_summary" in events.Tags()["tensors"]


def test_base_recipe_on_the_sample_corpus_warns(tmp_path: Path) -> None:
    """base.yaml's model and steps on the shipped sample corpus: thousands of epochs, and a loud warning."""
    config = yaml.safe_load((CONFIG_DIR / "base.yaml").read_text(encoding="utf-8"))
    data = {k: config["data"][k] for k in ("vocab_size", "block_size", "batch_size")}
    datamodule = AzGPTDataModule(data_dir=str(tmp_path / "sample"), corpus=None, **data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    model_args = {k: v for k, v in config["model"].items() if k in ("n_layer", "n_head", "n_embd", "bias")}
    model = AzGPT(vocab_size=data["vocab_size"], block_size=data["block_size"], **model_args)
    trainer = L.Trainer(max_steps=config["trainer"]["max_steps"], logger=False,
                        accumulate_grad_batches=config["trainer"]["accumulate_grad_batches"])
    budget = budget_of(trainer, model, datamodule)
    assert budget.consumed_tokens == 5000 * 48 * 512
    assert budget.parameters > 20_000_000
    assert budget.epochs > 1000
    assert "DATA BUDGET" in budget.warning(DataBudgetCheck().warn_above_epochs)


@pytest.mark.parametrize("configs, corpus, max_bytes", [
    (["base.yaml"], "fineweb2-az", "600MB"),
    (["quickstart.yaml", "laptop.yaml"], "fineweb2-az", "50MB"),
    (["base.yaml", "gpt2-small.yaml"], "fineweb2-az", "3GB"),
])
def test_real_text_configs_name_a_fineweb_slice(configs: list[str], corpus: str, max_bytes: str, capsys) -> None:
    from azgpt.train.lightning_cli import run_lightning_cli

    with pytest.raises(SystemExit):
        run_lightning_cli(["fit", *[a for c in configs for a in ("--config", c)], "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["corpus"] == [corpus] and printed["data"]["max_bytes"] == max_bytes
    assert printed["trainer"]["max_steps"] > 0 or printed["budget"]  # a step count, or a time budget that plans one
