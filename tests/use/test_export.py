"""Export to a Hugging Face GPT-2 folder: files, layout, bad input, and parity with transformers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from azgpt.checkpoint import load_checkpoint
from azgpt.cli import main
from azgpt.errors import AzGPTError
from azgpt.use.export import EXPORTED_FILES, write_hf_folder
from azgpt.model import GPT, GPTConfig

from tests.conftest import assert_same_tokenizer

TEXTS = [
    "Azərbaycan Respublikasının paytaxtı Bakı şəhəridir.",
    "İlham İşıq ışıqlı, ağ, öz, üç, çay, ğ, Ə və ə; Кирил ә Ә hərfi.",
    "1918-ci il 28 may!  Yeni sətir\nvə\ttab <|endoftext|> sonra",
]


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "azgpt-tiny"
    assert main(["export", "--ckpt", str(tiny_run.ckpt), "--out", str(out)]) == 0
    return out


def test_export_writes_the_hugging_face_files(exported: Path, tiny_run) -> None:
    assert sorted(p.name for p in exported.iterdir()) == sorted(EXPORTED_FILES)
    checkpoint = load_checkpoint(tiny_run.ckpt)
    cfg = checkpoint.config
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]
    assert (config["vocab_size"], config["n_positions"], config["n_embd"], config["n_layer"], config["n_head"]) == (
        cfg.vocab_size, cfg.block_size, cfg.n_embd, cfg.n_layer, cfg.n_head)
    assert config["activation_function"] == "gelu" and config["layer_norm_epsilon"] == 1e-5
    assert config["eos_token_id"] == config["bos_token_id"] == 0
    tokenizer_config = json.loads((exported / "tokenizer_config.json").read_text())
    assert tokenizer_config["eos_token"] == tokenizer_config["bos_token"] == "<|endoftext|>"
    assert Tokenizer.from_file(str(exported / "tokenizer.json")).to_str() == checkpoint.tokenizer.to_str()


def test_weights_use_gpt2_names_and_conv1d_layout(exported: Path, tiny_run) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(exported / "model.safetensors"))
    model = load_checkpoint(tiny_run.ckpt).build_model()
    cfg, own = model.config, model.state_dict()
    assert "lm_head.weight" not in tensors  # tied to wte, as save_pretrained writes it
    assert torch.equal(tensors["transformer.wte.weight"], own["transformer.wte.weight"][: cfg.vocab_size])
    assert torch.equal(tensors["transformer.h.0.attn.c_attn.weight"], own["transformer.h.0.attn.c_attn.weight"].t())
    assert tensors["transformer.h.0.mlp.c_fc.weight"].shape == (cfg.n_embd, 4 * cfg.n_embd)
    assert not cfg.bias
    assert torch.count_nonzero(tensors["transformer.h.0.mlp.c_fc.bias"]) == 0
    assert torch.count_nonzero(tensors["transformer.ln_f.bias"]) == 0


def test_model_card_tells_size_data_and_metrics(exported: Path) -> None:
    card = (exported / "README.md").read_text(encoding="utf-8")
    assert card.startswith("---\nlanguage: az")
    assert "parameters" in card and "1 layer," in card
    assert "hekayeler.txt" in card and "train split:" in card
    assert "val_loss = " in card and "val_bpb = " in card
    assert "trained for 4 optimizer steps" in card


def test_export_refuses_a_folder_with_files_unless_overwrite(exported: Path, tiny_run, capsys) -> None:
    assert main(["export", "--ckpt", str(tiny_run.ckpt), "--out", str(exported)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["export", "--ckpt", str(tiny_run.ckpt), "--out", str(exported), "--overwrite"]) == 0


def test_export_errors(tiny_run, tmp_path: Path, capsys) -> None:
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert main(["export", "--ckpt", str(tiny_run.ckpt), "--out", str(a_file)]) == 2
    assert "is a file" in capsys.readouterr().err
    missing = tmp_path / "missing.ckpt"
    assert main(["export", "--ckpt", str(missing), "--out", str(tmp_path / "out")]) == 2
    assert f"checkpoint {missing} does not exist" in capsys.readouterr().err


def test_export_without_safetensors_says_what_to_install(tiny_run, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # makes the import fail
    checkpoint = load_checkpoint(tiny_run.ckpt)
    with pytest.raises(AzGPTError, match=r"export needs the safetensors package: pip install safetensors$"):
        write_hf_folder(checkpoint.build_model(), checkpoint.tokenizer, tmp_path / "out", "card")


# ----------------------------------------------------------------------------- parity with transformers


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


def hf_logits(folder: Path, ids: list[int], transformers) -> torch.Tensor:
    model = transformers.GPT2LMHeadModel.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def test_transformers_loads_the_export_with_the_same_logits(exported: Path, tiny_run, transformers) -> None:
    checkpoint = load_checkpoint(tiny_run.ckpt)
    model = checkpoint.build_model()
    ids = checkpoint.tokenizer.encode(" ".join(TEXTS)).ids[: model.config.block_size]
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][0, :, : model.config.vocab_size]
    theirs = hf_logits(exported, ids, transformers)
    assert theirs.shape == ours.shape
    assert torch.allclose(theirs, ours, atol=1e-4, rtol=0)


def test_transformers_tokenizer_gives_the_same_ids(exported: Path, tiny_run, transformers) -> None:
    ours = load_checkpoint(tiny_run.ckpt).tokenizer
    theirs = transformers.PreTrainedTokenizerFast.from_pretrained(str(exported))
    assert_same_tokenizer(ours, theirs, TEXTS)


def test_transformers_greedy_generation_matches(exported: Path, tiny_run, transformers) -> None:
    checkpoint = load_checkpoint(tiny_run.ckpt)
    model = checkpoint.build_model()
    prompt = checkpoint.tokenizer.encode("Bakı şəhəri").ids
    ours = [int(t) for t in model.generate(torch.tensor([prompt]), 20, temperature=0.0)]
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(str(exported)).eval()
    out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=20, min_new_tokens=20, do_sample=False,
                            pad_token_id=0)
    assert out[0, len(prompt):].tolist() == ours


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_biases_and_layouts_survive_export(tiny_run, tmp_path: Path, transformers, activation: str) -> None:
    """With bias=True and every bias random, a transposed or misplaced tensor (or a different GELU) would
    change the logits."""
    tokenizer = load_checkpoint(tiny_run.ckpt).tokenizer
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.get_vocab_size(), block_size=40, n_layer=2, n_head=4, n_embd=32,
                          bias=True, activation=activation)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "ln" in name:
                param.normal_(0.0, 0.5)
    write_hf_folder(model, tokenizer, tmp_path / "hf", "card")
    ids = tokenizer.encode(TEXTS[0]).ids[:40]
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][0, :, : model.config.vocab_size]
    theirs = hf_logits(tmp_path / "hf", ids, transformers)
    assert torch.allclose(theirs, ours, atol=1e-4, rtol=0)


def test_model_card_names_licence_and_source_of_a_named_corpus() -> None:
    from azgpt.data.hub import provenance
    from azgpt.use.export import _data_lines

    lines = "\n".join(_data_lines({"source": ["fineweb2-az"], "corpora": [provenance("fineweb2-az")],
                                   "train_tokens": 1000}))
    assert "`fineweb2-az`: dataset `HuggingFaceFW/fineweb-2` config `azj_Latn` split `train`" in lines
    assert "licence ODC-By 1.0" in lines and "https://huggingface.co/datasets/HuggingFaceFW/fineweb-2" in lines



# ----------------------------------------------------------------------------- generation config and card

BASE_PATH = "lightning_logs/version_0/checkpoints/last.ckpt"  # where the fine-tune below says it started


@pytest.fixture(scope="module")
def tuned_export(tiny_run, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny run as azgpt finetune leaves a model: the chat template's tokens and the "azgpt" entry (300 + 4
    tokens still fit the embedding's 320 rows), and the init_from it records; exported as a Hugging Face folder."""
    from azgpt.data.chat import DEFAULT_TEMPLATE

    root = tmp_path_factory.mktemp("tuned")
    raw = torch.load(tiny_run.ckpt, weights_only=True)
    tokenizer = DEFAULT_TEMPLATE.add_to_tokenizer(Tokenizer.from_str(raw["azgpt"]["tokenizer"]))
    raw["hyper_parameters"].update(vocab_size=tokenizer.get_vocab_size(), init_from=BASE_PATH)
    raw["azgpt"] = {**raw["azgpt"], "tokenizer": tokenizer.to_str(), "chat_template": DEFAULT_TEMPLATE.to_dict()}
    torch.save(raw, root / "tuned.ckpt")
    assert main(["export", "--ckpt", str(root / "tuned.ckpt"), "--out", str(root / "azgpt-chat")]) == 0
    return root / "azgpt-chat"


def front_matter(folder: Path) -> dict:
    import yaml

    card = (folder / "README.md").read_text(encoding="utf-8")
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_gpt2_config_has_n_ctx_beside_n_positions(exported: Path, transformers) -> None:
    config = transformers.GPT2Config.from_pretrained(str(exported))
    assert config.n_positions == config.n_ctx == 96  # the tiny run's block


def test_generation_config_ends_at_end_of_text(exported: Path, transformers) -> None:
    config = transformers.GenerationConfig.from_pretrained(str(exported))
    # <|endoftext|> is id 0: the tokenizer's first token
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (0, 0, 0)


def test_a_chat_models_generation_stops_at_the_end_of_its_turn(tuned_export: Path, transformers) -> None:
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(str(tuned_export))
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    assert end == 303  # the fourth of the template's tokens after the tiny run's 300
    assert transformers.GenerationConfig.from_pretrained(str(tuned_export)).eos_token_id == [0, end]
    # A model whose every next token is <|end|>: ln_f outputs <|end|>'s (enlarged) embedding row, and the tied
    # head scores that row against itself highest. generate must stop after it, as azgpt's chat does.
    model = transformers.GPT2LMHeadModel.from_pretrained(str(tuned_export)).eval()
    with torch.no_grad():
        model.transformer.wte.weight[end] *= 10
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(model.transformer.wte.weight[end])
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Salam!"}], add_generation_prompt=True)
    prompt = prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt
    out = model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)
    assert out[0, len(prompt):].tolist() == [end]


def test_model_card_front_matter_names_licence_data_and_base(exported: Path, tuned_export: Path) -> None:
    base = front_matter(exported)
    # The tiny run trained on the sample corpus, released with azgpt under Apache-2.0 (sample_corpus/ORIGIN.md).
    assert base["license"] == "apache-2.0" and base["language"] == "az"
    assert "base_model" not in base and "datasets" not in base  # not a fine-tune; no Hub dataset
    tuned = front_matter(tuned_export)
    assert tuned["base_model"] == BASE_PATH and tuned["license"] == "apache-2.0"
    card = (tuned_export / "README.md").read_text(encoding="utf-8")
    assert f"fine-tuned from `{BASE_PATH}`" in card and "replace it with the base model's Hub id" in card


def test_a_model_folder_keeps_the_base_model(tuned_export: Path, tmp_path: Path) -> None:
    tuned_ckpt = tuned_export.parent / "tuned.ckpt"
    assert main(["export", "--ckpt", str(tuned_ckpt), "--format", "azgpt", "--out", str(tmp_path / "model")]) == 0
    assert main(["export", "--ckpt", str(tmp_path / "model"), "--out", str(tmp_path / "hf")]) == 0
    assert front_matter(tmp_path / "hf")["base_model"] == BASE_PATH


@pytest.mark.parametrize("which", ["base", "chat"])
def test_the_model_cards_example_runs(exported: Path, tuned_export: Path, transformers, which: str, monkeypatch,
                                      capsys) -> None:
    folder = exported if which == "base" else tuned_export
    card = (folder / "README.md").read_text(encoding="utf-8")
    code = card.split("```python\n")[1].split("```")[0]
    assert ("apply_chat_template" in code) == (which == "chat")
    monkeypatch.chdir(folder.parent)  # the example names the folder as it would a Hub repo
    torch.manual_seed(0)
    exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize("sources, corpora, license, datasets, says", [
    (["fineweb2-az"], ["fineweb2-az"], "odc-by", ["HuggingFaceFW/fineweb-2"], None),
    (["wikipedia-az?split=train"], ["wikipedia-az?split=train"], "cc-by-sa-4.0", ["wikimedia/wikipedia"], None),
    (["fineweb2-az", "wikipedia-az"], ["fineweb2-az", "wikipedia-az"], "other",
     ["HuggingFaceFW/fineweb-2", "wikimedia/wikipedia"], "several licences"),
    (["hplt2-az"], ["hplt2-az"], "other", ["HPLT/HPLT2.0_cleaned"], "licence of `hplt2-az` is not known"),
    (["/home/me/news.txt", "fineweb2-az"], ["fineweb2-az"], "other", ["HuggingFaceFW/fineweb-2"],
     "licence of `news.txt` is not known"),
    (["/venv/lib/azgpt/sample_corpus/hekayeler.txt", "/venv/lib/azgpt/sample_instructions/instructions.jsonl"], [],
     "apache-2.0", None, None),
    (None, [], "other", None, "training data is not recorded"),
])
def test_model_card_licence_and_datasets(sources, corpora, license, datasets, says) -> None:
    import yaml
    from azgpt.data.hub import provenance
    from azgpt.use.export import card_metadata

    data = None if sources is None else {"source": sources, "corpora": [provenance(c) for c in corpora]}
    front, todo = card_metadata(data, None)
    meta = yaml.safe_load("\n".join(front))
    assert meta["license"] == license
    assert meta.get("datasets") == datasets
    if says is None:
        assert todo == []
    else:
        assert len(todo) == 1 and says in todo[0] and "Set it before publishing" in todo[0]
