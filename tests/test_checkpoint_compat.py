"""A checkpoint written by azgpt 0.2.0 (tests/fixtures) still loads, generates, exports and resumes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from azgpt.artifact import load_model
from azgpt.cli import main
from azgpt.data.prepare import PrepareConfig, prepare

OLD = Path(__file__).resolve().parent / "fixtures" / "azgpt-0.2.0-tiny.ckpt"


# What the code that wrote the fixture (the parent of the commit that added it) computes from it: the ids of
# "Bakı şəhəri" and the first 8 logits after them, so a change in how the file is read or the model computes is seen.
OLD_IDS = [34, 65, 75, 258, 221, 260, 257, 72, 261, 73]
OLD_LOGITS = [-0.14932, -0.17308, 0.07186, 0.11224, -0.09629, 0.04096, 0.11078, -0.06147]


def test_an_old_checkpoint_loads_and_generates(capsys) -> None:
    model = load_model(OLD)
    assert (model.config.n_layer, model.config.n_embd, model.config.vocab_size) == (1, 32, 300)
    gpt = model.build_model().eval()
    assert model.tokenizer.encode("Bakı şəhəri").ids == OLD_IDS
    with torch.no_grad():
        logits, _ = gpt(torch.tensor([OLD_IDS]))
    assert torch.allclose(logits[0, -1, :8], torch.tensor(OLD_LOGITS), atol=1e-5)
    assert main(["generate", "--ckpt", str(OLD), "--prompt", "Bakı", "--max_new_tokens", "8", "--temperature", "0",
                 "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("Bakı")


def test_an_old_checkpoint_exports_a_model_folder_with_the_same_weights(tmp_path, capsys) -> None:
    assert main(["export", "--ckpt", str(OLD), "--format", "azgpt", "--out", str(tmp_path / "model")]) == 0
    old, new = load_model(OLD), load_model(tmp_path / "model")
    assert new.config == old.config and new.raw["global_step"] == 2
    for name, tensor in old.state_dict.items():
        assert torch.equal(new.state_dict[name], tensor), name


@pytest.mark.slow
def test_an_old_checkpoint_resumes(tmp_path, monkeypatch, capsys) -> None:
    """Its training state continues: data prepared with its own tokenizer, two more steps from step 2."""
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text(load_model(OLD).tokenizer.to_str(), encoding="utf-8")
    data = tmp_path / "data"
    prepare(PrepareConfig(out=data, vocab_size=300, block_size=32, val_fraction=0.1, tokenizer=tokenizer))
    run = tmp_path / "run" / "lightning_logs" / "version_0" / "checkpoints"
    run.mkdir(parents=True)
    shutil.copy(OLD, run / "last.ckpt")
    monkeypatch.chdir(tmp_path / "run")
    code = main(["fit", "--config", "quickstart.yaml", "--ckpt_path", "last", "--trainer.max_steps", "4",
                 "--val_every_n_steps", "2", "--trainer.accumulate_grad_batches", "1",
                 "--trainer.enable_progress_bar", "false", "--model.n_layer", "1", "--model.n_head", "2",
                 "--model.n_embd", "32", "--model.dropout", "0.0", "--data.vocab_size", "300",
                 "--data.block_size", "32", "--data.batch_size", "2", "--data.val_max_blocks", "4",
                 "--data.data_dir", str(data)])
    assert code == 0, capsys.readouterr().err[-2000:]
    meta = json.loads((tmp_path / "run" / "lightning_logs" / "version_1" / "model" / "meta.json").read_text())
    assert meta["global_step"] == 4


def test_an_old_checkpoint_loads_in_a_notebook_and_starts_a_finetune() -> None:
    """Its flat hyper_parameters still build AzGPT (load_from_checkpoint) and AzGPTFinetune (init_from)."""
    from azgpt.train.finetune import AzGPTFinetune
    from azgpt.train.module import AzGPT

    model = AzGPT.load_from_checkpoint(OLD, map_location="cpu")
    assert model.config == load_model(OLD).config and model.optim.learning_rate == 0.002
    tuned = AzGPTFinetune(init_from=str(OLD))
    assert tuned.config.n_embd == 32 and tuned.hparams.init_from == str(OLD)
    assert tuned.config.vocab_size > model.config.vocab_size  # grown by the chat template's tokens
