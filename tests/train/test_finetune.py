"""azgpt finetune: weights from a base checkpoint, the grown embedding, the stored template, resume, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from azgpt.checkpoint import load_checkpoint
from azgpt.cli import main
from azgpt.data.chat import DEFAULT_TEMPLATE, sample_instructions_path
from azgpt.train.finetune import AzGPTFinetune, resize_token_embedding
from azgpt.sampling import Generator
from resume_helpers import read_final, read_losses

pytestmark = pytest.mark.filterwarnings("ignore")


def finetune_config(run: Path, base: Path, files: list[str] | None = None, max_steps: int = 4,
                    callbacks: list[dict] | None = None, **model: object) -> Path:
    """A fine-tune of ``base`` logging to ``run/lightning_logs/finetune`` and recording its losses."""
    run.mkdir(parents=True, exist_ok=True)
    config = {
        "seed_everything": 1337,
        "val_every_n_steps": 2,
        "model": {"init_from": str(base), "learning_rate": 3e-3, "warmup_steps": 2, "dropout": 0.1, **model},
        "data": {"files": files, "batch_size": 4, "val_fraction": 0.1},
        "trainer": {
            "max_steps": max_steps, "accumulate_grad_batches": 2, "gradient_clip_val": 1.0,
            "num_sanity_val_steps": 0, "enable_progress_bar": False, "enable_model_summary": False,
            "log_every_n_steps": 1,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(run / "lightning_logs"), "name": "finetune"}},
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"monitor": "val_loss", "save_last": True, "filename": "best-{step}"}},
                {"class_path": "resume_helpers.LossRecorder", "init_args": {"path": str(run / "losses.txt")}},
                *(callbacks or []),
            ],
        },
    }
    path = run / "finetune.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def last_ckpt(run: Path) -> Path:
    return run / "lightning_logs" / "finetune" / "version_0" / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, tiny_run) -> Path:
    """A 4-step fine-tune of the tiny base model on the shipped sample."""
    run = tmp_path_factory.mktemp("finetune")
    assert main(["finetune", "--config", str(finetune_config(run, tiny_run.ckpt))]) == 0
    return run


def test_resize_keeps_old_rows_and_starts_new_ones_at_the_mean() -> None:
    weight = torch.randn(320, 8)
    resized = resize_token_embedding(weight, 384, known_tokens=300, new_ids=[300, 301, 302, 303])
    assert resized.shape == (384, 8)
    assert torch.equal(resized[:300], weight[:300]) and torch.equal(resized[304:320], weight[304:320])
    mean = weight[:300].mean(dim=0)
    assert torch.equal(resized[300:304], mean.expand(4, 8)) and torch.equal(resized[320:], mean.expand(64, 8))


def test_finetune_starts_from_the_base_weights_with_the_embedding_grown(tiny_run) -> None:
    base = load_checkpoint(tiny_run.ckpt)
    model = AzGPTFinetune(init_from=str(tiny_run.ckpt))
    known = base.tokenizer.get_vocab_size()
    assert model.hparams.vocab_size == known + 4 and model.hparams.n_embd == base.config.n_embd
    grown = model.model.state_dict()
    for name, value in base.state_dict.items():
        if name in ("transformer.wte.weight", "lm_head.weight"):
            assert torch.equal(grown[name][:known], value[:known]), "an old token row changed"
            assert torch.equal(grown[name][known:known + 4], value[:known].mean(dim=0).expand(4, -1))
        else:
            assert torch.equal(grown[name], value), f"{name} is not the base model's"
    assert model.model.lm_head.weight is model.model.transformer.wte.weight  # still tied


def test_an_untied_head_grows_from_its_own_rows(tmp_path: Path) -> None:
    """A modern-recipe base has a head of its own: fine-tuning keeps it, it is not replaced by the embedding."""
    import os

    from conftest import TINY_FIT

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert main([*TINY_FIT, "--data.data_dir", str(tmp_path / "data"), "--model.recipe", "modern",
                     "--model.zero_init", "false"]) == 0
    finally:
        os.chdir(cwd)
    ckpt = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    base = load_checkpoint(ckpt)
    model = AzGPTFinetune(init_from=str(ckpt))
    known = base.tokenizer.get_vocab_size()
    grown = model.model.state_dict()
    assert model.model.lm_head.weight is not model.model.transformer.wte.weight
    for name in ("transformer.wte.weight", "lm_head.weight"):
        assert torch.equal(grown[name][:known], base.state_dict[name][:known]), f"{name}: an old row changed"
        assert torch.equal(grown[name][known:known + 4], base.state_dict[name][:known].mean(dim=0).expand(4, -1))
    assert not torch.equal(grown["lm_head.weight"], grown["transformer.wte.weight"])


def test_the_checkpoint_carries_the_template_for_chat_generate_and_export(finetuned: Path, tiny_run) -> None:
    ckpt = load_checkpoint(last_ckpt(finetuned))
    assert ckpt.chat_template == DEFAULT_TEMPLATE.to_dict()
    ids = DEFAULT_TEMPLATE.token_ids(ckpt.tokenizer)  # the stored tokenizer has the template's tokens
    assert ckpt.config.vocab_size == max(ids.values()) + 1
    assert ckpt.raw["global_step"] == 4 and ckpt.raw["hyper_parameters"]["init_from"] == str(tiny_run.ckpt)
    assert ckpt.summary["data"]["source"] == [str(sample_instructions_path())]
    assert ids["end"] in Generator.from_checkpoint(last_ckpt(finetuned)).stop_ids
    assert load_checkpoint(tiny_run.ckpt).chat_template is None  # a base model has none
    assert sorted(p.name for p in (finetuned / "lightning_logs/finetune/version_0").glob("events.out.*"))


def test_a_base_checkpoint_that_is_not_azgpts_is_refused(tmp_path: Path, capsys) -> None:
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"weight": torch.zeros(2)}}, foreign)
    config = finetune_config(tmp_path / "run", foreign)
    assert main(["finetune", "--config", str(config)]) == 2
    assert f"{foreign} is not an azgpt checkpoint" in capsys.readouterr().err
    missing = finetune_config(tmp_path / "run2", tmp_path / "nowhere.ckpt")
    assert main(["finetune", "--config", str(missing)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bad_instruction_data_is_one_line_naming_file_and_line(tmp_path: Path, tiny_run, capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Salam", "response": "Salam!"}\n{"prompt": "Necəsən?"}\n', encoding="utf-8")
    config = finetune_config(tmp_path / "run", tiny_run.ckpt, files=[str(bad)])
    assert main(["finetune", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"azgpt: error: {bad}:2: missing field 'response'" in err and "Traceback" not in err


@pytest.mark.slow
def test_an_interrupted_finetune_resumes_exactly(tmp_path: Path, tiny_run, capsys) -> None:
    reference, run = tmp_path / "reference", tmp_path / "run"
    assert main(["finetune", "--config", str(finetune_config(reference, tiny_run.ckpt, max_steps=6))]) == 0
    stop = [{"class_path": "resume_helpers.SelfSignal", "init_args": {"signal": "SIGTERM", "step": 3, "micro": 1}}]
    assert main(["finetune", "--config", str(finetune_config(run, tiny_run.ckpt, max_steps=6, callbacks=stop))]) == 143
    assert sorted(read_losses(run)) == [1, 2, 3]
    assert main(["finetune", "--config", str(finetune_config(run, tiny_run.ckpt, max_steps=6)),
                 "--ckpt_path", "last"]) == 0
    expected, seen = read_losses(reference), read_losses(run)
    assert sorted(seen) == list(range(1, 7))
    assert all(torch.equal(seen[step], expected[step]) for step in expected), "a loss differs after resume"
    final, want = read_final(run), read_final(reference)
    assert all(torch.equal(final["model"][name], value) for name, value in want["model"].items())


@pytest.fixture(scope="module")
def overfit(tmp_path_factory, tiny_run) -> Path:
    """The tiny base fine-tuned hard on 8 conversations of the shipped sample, so it has surely learned the
    template's shape (the closing note of the README shows the quickstart model on the whole sample)."""
    run = tmp_path_factory.mktemp("overfit")
    lines = sample_instructions_path().read_text(encoding="utf-8").splitlines()
    few = [line for line in lines if '"prompt"' in line][:8]
    files = run / "few.jsonl"
    files.write_text("\n".join(few) + "\n", encoding="utf-8")
    config = finetune_config(run, tiny_run.ckpt, files=[str(files)], max_steps=60, learning_rate=1e-2, dropout=0.0,
                             warmup_steps=5)
    assert main(["finetune", "--config", str(config), "--trainer.accumulate_grad_batches", "1",
                 "--data.batch_size", "8", "--val_every_n_steps", "30"]) == 0
    return last_ckpt(run)


@pytest.mark.slow
def test_after_finetuning_replies_follow_the_template(overfit: Path) -> None:
    """Structure, not wording: a greedy reply is text ending with <|end|>, with no role token inside."""
    from azgpt.use.chat import ChatSession
    from azgpt.sampling import Sampling

    session = ChatSession.from_checkpoint(overfit, device="cpu", sampling=Sampling(60, temperature=0.0))
    ids = DEFAULT_TEMPLATE.token_ids(session.generator.tokenizer)
    special = set(ids.values())
    for question in ("Salam!", "Bakı harada yerləşir?"):
        prompt = session.prompt_ids(question)
        tokens = [int(t[0]) for t in session.generator.model.generate(torch.tensor([prompt]), 60, temperature=0.0)]
        assert ids["end"] in tokens, "the reply never ended with <|end|>"
        reply = tokens[: tokens.index(ids["end"])]
        assert reply and not special & set(reply)
        assert "".join(session.reply(question)) == session.generator.tokenizer.decode(reply)


def test_export_gives_hugging_face_the_same_chat_template(finetuned: Path, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from azgpt.data.chat import Message
    from azgpt.use.export import export_checkpoint

    folder = export_checkpoint(last_ckpt(finetuned), tmp_path / "hf")
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    messages = [Message("system", "Qısa cavab ver."), Message("user", "Salam!"), Message("assistant", "Salam.")]
    rendered = hf.apply_chat_template([{"role": m.role, "content": m.content} for m in messages], tokenize=False,
                                      add_generation_prompt=True)
    assert rendered == DEFAULT_TEMPLATE.render(messages, add_generation_prompt=True)
    ours, _ = DEFAULT_TEMPLATE.encode(load_checkpoint(last_ckpt(finetuned)).tokenizer, messages,
                                      add_generation_prompt=True)
    assert hf(rendered, add_special_tokens=False)["input_ids"] == ours


def test_a_modern_model_is_fine_tuned_with_the_optimizer_it_was_trained_with(tmp_path, monkeypatch) -> None:
    """A modern-recipe base keeps Muon for its block matrices (it used to get AdamW without a word), from its
    .ckpt and from its model folder alike; model.optimizer still chooses."""
    from azgpt.cli import main
    from azgpt.train.finetune import AzGPTFinetune
    from azgpt.train.muon import MuonWithAdamW
    from conftest import tiny_fit_args

    monkeypatch.chdir(tmp_path)
    assert main(tiny_fit_args(tmp_path / "data", max_steps=2, **{"--model.recipe": "modern"})) == 0
    run = tmp_path / "lightning_logs" / "version_0"
    for base in (run / "checkpoints" / "last.ckpt", run / "model"):
        model = AzGPTFinetune(init_from=str(base))
        assert model.hparams.optimizer == "muon"
        assert isinstance(model.build_optimizer()[0], MuonWithAdamW)
    assert AzGPTFinetune(init_from=str(run / "model"), optimizer="adamw").hparams.optimizer == "adamw"
