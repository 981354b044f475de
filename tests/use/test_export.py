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

