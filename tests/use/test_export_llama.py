"""A modern-recipe model exports as a Hugging Face LlamaForCausalLM folder with the same logits."""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from azgpt.checkpoint import load_checkpoint
from azgpt.cli import main
from azgpt.errors import AzGPTError
from azgpt.model import GPT, RECIPES, GPTConfig
from azgpt.use.export import write_hf_folder
from azgpt.use.adapters import hf_architecture
from conftest import TINY_FIT

TEXT = "Azərbaycan Respublikasının paytaxtı Bakı şəhəridir. 1918-ci il 28 may!\nYeni sətir"


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


def random_modern(vocab_size: int, **overrides) -> GPT:
    """A modern-recipe model with every weight random (zero_init off, norm gains and biases drawn too), so a
    misplaced, transposed or swapped tensor would change the logits."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=vocab_size, block_size=40, n_layer=2, n_head=4, n_embd=32,
                       **{**RECIPES["modern"], "zero_init": False, "rope_theta": 500.0, **overrides})
    model = GPT(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "ln" in name:
                param.normal_(1.0 if "ln" in name else 0.0, 0.5)
    return model


@pytest.mark.parametrize("overrides", [{}, {"bias": True}, {"tie_embeddings": True, "embedding_norm": False},
                                       {"embedding_norm": False}],
                         ids=["recipe", "bias", "tied", "raw-embedding"])
def test_llama_export_has_the_same_logits_and_greedy_text(tiny_run, tmp_path: Path, transformers, overrides) -> None:
    tokenizer = load_checkpoint(tiny_run.ckpt).tokenizer
    model = random_modern(tokenizer.get_vocab_size(), **overrides)
    write_hf_folder(model, tokenizer, tmp_path / "hf", "card")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["intermediate_size"] == model.config.mlp_hidden
    hf_model = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    ids = tokenizer.encode(TEXT).ids[:40]
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][0, :, : model.config.vocab_size]
        theirs = hf_model(torch.tensor([ids])).logits[0]
    assert theirs.shape == ours.shape
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
    prompt = ids[:5]
    greedy = [int(t) for t in model.generate(torch.tensor([prompt]), 20, temperature=0.0)]
    out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=20, min_new_tokens=20, do_sample=False,
                            pad_token_id=0)
    assert out[0, len(prompt):].tolist() == greedy


@pytest.mark.parametrize("overrides, message", [
    ({"qk_norm": True}, "qk_norm True"),
    ({"logit_softcap": 15.0}, "logit_softcap 15.0"),
    ({"mlp": "relu2"}, "mlp 'relu2'"),
    ({"position": "learned"}, "tie_embeddings False"),
    ({"tie_embeddings": True, "embedding_norm": True}, "tie_embeddings True \\(needs False\\)"),  # raw rows
])
def test_what_neither_gpt2_nor_llama_computes_is_refused(tmp_path: Path, overrides, message) -> None:
    model = random_modern(300, **overrides)
    with pytest.raises(AzGPTError, match=f"cannot be exported.*{message}"):
        write_hf_folder(model, None, tmp_path / "hf", "card")
    assert not (tmp_path / "hf").exists()
    assert hf_architecture(GPTConfig()) == "GPT2LMHeadModel"


@pytest.mark.slow
def test_export_verb_writes_a_llama_folder_for_a_modern_checkpoint(tmp_path: Path, transformers, capsys) -> None:
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert main([*TINY_FIT, "--data.data_dir", str(tmp_path / "data"), "--model.recipe", "modern"]) == 0
    finally:
        os.chdir(cwd)
    ckpt = tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt"
    assert main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "hf")]) == 0
    assert "LlamaForCausalLM.from_pretrained" in capsys.readouterr().out
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "A Llama style" in card and "LlamaForCausalLM.from_pretrained" in card
    checkpoint = load_checkpoint(ckpt)
    model = checkpoint.build_model()
    assert model.config.position == "rope" and not model.config.tie_embeddings
    ids = checkpoint.tokenizer.encode(TEXT).ids[:64]
    hf_model = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][0, :, : model.config.vocab_size]
        theirs = hf_model(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
    if importlib.util.find_spec("gguf"):  # the same checkpoint as llama.cpp's llama (parity: the test above)
        assert main(["export", "--ckpt", str(ckpt), "--format", "gguf", "--out", str(tmp_path / "gguf")]) == 0
        assert "tanh" not in capsys.readouterr().out  # SwiGLU has no GELU for llama.cpp to approximate
        reader = importlib.import_module("gguf").GGUFReader(str(tmp_path / "gguf" / "gguf-f16.gguf"))
        assert reader.fields["general.architecture"].contents() == "llama"


# ----------------------------------------------------------------------------------- GGUF: llama.cpp's llama


@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": True, "embedding_norm": False}, {"embedding_norm": False}],
                         ids=["recipe", "tied", "raw-embedding"])
def test_llama_gguf_loads_in_transformers_with_the_same_logits(tiny_run, tmp_path: Path, transformers,
                                                              outtype: str, overrides) -> None:
    """transformers' GGUF reader undoes llama.cpp's rotary row order itself, so equal logits check the reorder."""
    gguf = pytest.importorskip("gguf")
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF file")
    from azgpt.use.gguf import write_gguf

    tokenizer = load_checkpoint(tiny_run.ckpt).tokenizer
    model = random_modern(tokenizer.get_vocab_size(), **overrides)
    path = tmp_path / f"modern-{outtype}.gguf"
    write_gguf(model, tokenizer, path, outtype)

    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["llama.rope.freq_base"].contents() == pytest.approx(500.0)
    assert reader.fields["llama.feed_forward_length"].contents() == model.config.mlp_hidden
    names = {tensor.name for tensor in reader.tensors}
    assert ("output.weight" in names) == (not model.config.tie_embeddings)
    assert {"blk.1.attn_q.weight", "blk.1.ffn_gate.weight", "blk.1.ffn_up.weight", "output_norm.weight"} <= names

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name,
                                                                 dtype=torch.float32).eval()
    ids = tokenizer.encode(TEXT).ids[:40]
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][0, :, : model.config.vocab_size]
        theirs = hf_model(torch.tensor([ids])).logits[0]
    assert theirs.shape == ours.shape
    # (a) Against azgpt's model with its matrices rounded as the file stores them: the same function, so float32
    # noise only. Rows are rounded in blocks along n_embd, so splitting c_attn / c_fc and reordering q / k rows
    # for llama.cpp's rotary layout changes nothing in the rounding.
    qtype = gguf.GGMLQuantizationType[outtype.upper()]
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        if model.config.embedding_norm:  # the file holds the normalised rows (folded): round those
            rounded.transformer.wte.weight.copy_(model.normalise_embedding(model.transformer.wte.weight))
            rounded.config = replace(model.config, embedding_norm=False)
        for param in rounded.parameters():
            if param.dim() == 2:
                decoded = gguf.quants.dequantize(gguf.quants.quantize(param.numpy(), qtype), qtype)
                param.copy_(torch.from_numpy(np.asarray(decoded, dtype=np.float32)).reshape(param.shape))
        exact = rounded(torch.tensor([ids]))[0][0, :, : model.config.vocab_size]
    assert torch.allclose(theirs, exact, atol=1e-4, rtol=0)
    # (b) Against the f32 model: the rounding's effect, in the rounding units test_gguf.py derives its limits in.
    from tests.use.test_gguf import ROUNDING_UNIT, TOLERANCE_UNITS

    scale = ours.abs().max().item()
    tolerance = 1e-4 + TOLERANCE_UNITS[outtype] * ROUNDING_UNIT[outtype] * scale
    assert (theirs - ours).abs().max().item() <= tolerance, f"{(theirs - ours).abs().max().item() / scale:.2e}"
    if outtype == "f32":  # the rows stored for q and k are azgpt's, reordered: undo it and compare exactly
        from azgpt.use.gguf import rope_pairs_adjacent

        stored = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
        rows = torch.from_numpy(stored.data.copy()).reshape(model.config.n_embd, model.config.n_embd)
        q = model.transformer.h[0].attn.c_attn.weight[: model.config.n_embd].detach()
        assert torch.equal(rows, rope_pairs_adjacent(q, model.config.n_head))
        assert not torch.equal(rows, q)

