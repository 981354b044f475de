"""Training end to end: fit lowers val_loss, TensorBoard tags, metric definitions, reload, notebook use."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from azgpt.data.datamodule import AzGPTDataModule, FixedValBlocks
from azgpt.data.loading import block_offsets
from azgpt.train.module import AzGPT, warmup_cosine
from azgpt.data.tokenizer import load_tokenizer, token_byte_lengths
from tests.conftest import TINY_BLOCK, TINY_VOCAB


def scalars(run_dir: Path) -> dict[str, list[float]]:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def best_checkpoint(run_dir: Path) -> Path:
    return next(p for p in (run_dir / "checkpoints").glob("best-*.ckpt"))


def test_fit_lowers_val_loss_and_logs_every_curve(trained_run: Path) -> None:
    curves = scalars(trained_run)
    for tag in ("train_loss", "val_loss", "val_ppl", "val_bpb", "lr-AdamW/decay", "tokens_per_sec", "grad_norm"):
        assert tag in curves, f"{tag} missing from {sorted(curves)}"
    assert len(curves["val_loss"]) == 2  # validated at optimizer steps 3 and 6
    assert curves["val_loss"][-1] < curves["val_loss"][0]
    assert all(v > 0 for v in curves["tokens_per_sec"])
    assert (trained_run / "checkpoints" / "last.ckpt").is_file()
    assert (trained_run / "config.yaml").is_file()


def test_val_ppl_is_exp_val_loss(trained_run: Path) -> None:
    curves = scalars(trained_run)
    for loss, ppl in zip(curves["val_loss"], curves["val_ppl"]):
        assert ppl == pytest.approx(math.exp(loss), rel=1e-5)


def test_first_loss_is_near_log_vocab(trained_run: Path) -> None:
    assert scalars(trained_run)["train_loss"][0] == pytest.approx(math.log(TINY_VOCAB), abs=0.1)


def test_val_loss_is_token_weighted_nll_over_fixed_blocks(trained_run: Path, prepared_dir: Path) -> None:
    model = AzGPT.load_from_checkpoint(best_checkpoint(trained_run), map_location="cpu", weights_only=True)
    dm = AzGPTDataModule(data_dir=str(prepared_dir), vocab_size=TINY_VOCAB, block_size=TINY_BLOCK,
                         batch_size=4, val_max_blocks=13)  # 13 blocks: the last batch is short
    metrics = L.Trainer(logger=False, enable_progress_bar=False).validate(model, datamodule=dm)[0]

    tokens = np.load(prepared_dir / "val.npy", mmap_mode="r")
    blocks = FixedValBlocks(tokens, TINY_BLOCK, 13)
    lengths = torch.tensor(token_byte_lengths(load_tokenizer(prepared_dir / "tokenizer.json")))
    nll, count, nbytes = 0.0, 0, 0
    model.eval()
    with torch.no_grad():
        for i in range(len(blocks)):
            x, y = blocks[i]
            logits, _ = model.model(x[None])
            nll += F.cross_entropy(logits[0].double(), y, reduction="sum").item()
            count += y.numel()
            nbytes += int(lengths[y].sum())
    assert metrics["val_loss"] == pytest.approx(nll / count, abs=1e-5)
    assert metrics["val_ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert metrics["val_bpb"] == pytest.approx(nll / math.log(2) / nbytes, rel=1e-5)


def test_reloaded_checkpoint_validates_to_the_same_loss(trained_run: Path, prepared_dir: Path) -> None:
    """Notebook use: DataModule + load_from_checkpoint + Trainer.validate, twice, same numbers."""
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    dm = AzGPTDataModule(data_dir=str(prepared_dir), vocab_size=TINY_VOCAB, block_size=TINY_BLOCK, batch_size=4)
    first = L.Trainer(logger=False, enable_progress_bar=False).validate(
        AzGPT.load_from_checkpoint(ckpt, weights_only=True), datamodule=dm)[0]
    second = L.Trainer(logger=False, enable_progress_bar=False).validate(
        AzGPT.load_from_checkpoint(ckpt, weights_only=True), datamodule=dm)[0]
    assert set(first) == {"val_loss", "val_ppl", "val_bpb"}
    assert first["val_loss"] == pytest.approx(second["val_loss"], abs=1e-6)


def test_checkpoint_from_before_the_activation_setting_keeps_tanh_gelu(trained_run: Path, tmp_path: Path) -> None:
    """Checkpoints written before ``activation`` existed were trained with GPT-2's tanh GELU: every reader
    (Lightning's load_from_checkpoint and generate/export's load_checkpoint) must rebuild them that way."""
    from azgpt.checkpoint import load_checkpoint

    raw = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert raw["hyper_parameters"]["activation"] == "gelu"  # what new runs write
    del raw["hyper_parameters"]["activation"]
    old = tmp_path / "old.ckpt"
    torch.save(raw, old)

    module = AzGPT.load_from_checkpoint(old, weights_only=True)
    assert module.hparams.activation == "gelu_tanh" and module.model.config.activation == "gelu_tanh"
    assert {block.mlp.gelu.approximate for block in module.model.transformer.h} == {"tanh"}
    plain = load_checkpoint(old).build_model()
    assert plain.config.activation == "gelu_tanh"
    idx = torch.randint(0, TINY_VOCAB, (2, TINY_BLOCK))
    module.model.eval()
    with torch.no_grad():
        assert torch.equal(module.model(idx)[0], plain(idx)[0])
        exact = AzGPT.load_from_checkpoint(trained_run / "checkpoints" / "last.ckpt", weights_only=True).model.eval()
        assert not torch.equal(exact(idx)[0], plain(idx)[0])


def test_checkpoint_carries_the_tokenizer(trained_run: Path, prepared_dir: Path) -> None:
    model = AzGPT.load_from_checkpoint(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert model.tokenizer_json == load_tokenizer(prepared_dir / "tokenizer.json").to_str()


def test_training_blocks_are_a_pure_function_of_seed_step_and_rank() -> None:
    a = block_offsets(seed=1, rank=0, micro_batch_index=7, batch_size=8, high=10_000)
    assert np.array_equal(a, block_offsets(seed=1, rank=0, micro_batch_index=7, batch_size=8, high=10_000))
    assert not np.array_equal(a, block_offsets(seed=1, rank=1, micro_batch_index=7, batch_size=8, high=10_000))
    assert not np.array_equal(a, block_offsets(seed=1, rank=0, micro_batch_index=8, batch_size=8, high=10_000))
    assert not np.array_equal(a, block_offsets(seed=2, rank=0, micro_batch_index=7, batch_size=8, high=10_000))


def test_train_dataloader_starts_at_the_restored_step(prepared_dir: Path) -> None:
    dm = AzGPTDataModule(data_dir=str(prepared_dir), vocab_size=TINY_VOCAB, block_size=TINY_BLOCK, batch_size=4)
    dm.setup("fit")
    full = dm.train_dataset()
    resumed = dm.train_dataset()
    resumed.start_index = 10
    first_resumed = next(iter(resumed))
    expected = full.batch_at(10)
    assert torch.equal(first_resumed[0], expected[0]) and torch.equal(first_resumed[1], expected[1])
    x, y = expected
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_learning_rate_schedule_warms_up_then_decays_to_the_floor() -> None:
    lrs = [warmup_cosine(s, warmup_steps=10, decay_steps=100, min_lr_ratio=0.1) for s in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[100] == pytest.approx(0.1) and lrs[119] == pytest.approx(0.1)


def test_weight_decay_only_on_matrices() -> None:
    model = AzGPT(vocab_size=300, block_size=16, n_layer=1, n_head=2, n_embd=32, bias=True)
    model.trainer = None  # configure_optimizers reads max_steps through decay_steps instead
    model.hparams.decay_steps = 10
    groups = model.configure_optimizers()["optimizer"].param_groups
    assert groups[0]["weight_decay"] > 0 and all(p.dim() >= 2 for p in groups[0]["params"])
    assert groups[1]["weight_decay"] == 0 and all(p.dim() < 2 for p in groups[1]["params"])
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in model.parameters())


def test_a_diverged_model_reports_nan_not_a_finite_val_loss(trained_run: Path, prepared_dir: Path) -> None:
    model = AzGPT.load_from_checkpoint(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    with torch.no_grad():
        model.model.transformer.h[0].mlp.c_fc.weight.fill_(float("nan"))
    dm = AzGPTDataModule(data_dir=str(prepared_dir), vocab_size=TINY_VOCAB, block_size=TINY_BLOCK, batch_size=4)
    metrics = L.Trainer(logger=False, enable_progress_bar=False).validate(model, datamodule=dm)[0]
    assert math.isnan(metrics["val_loss"])
