"""Export to GGUF: the file as gguf's own reader and transformers read it, parity with azgpt, bad input, greedy
generation in a real llama.cpp past the model's context (node-llama-cpp's prebuilt build, installed into
tests/node_llama_cpp by npm), and in llama-cpp-python where that is installed."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from azgpt.checkpoint import Checkpoint, load_checkpoint
from azgpt.cli import main
from azgpt.errors import AzGPTError
from azgpt.model import GPT, RECIPES, GPTConfig
from azgpt.data.chat import DEFAULT_TEMPLATE, Message
from azgpt.use.gguf import OUTTYPES, export_gguf, modelfile, write_gguf

gguf = pytest.importorskip("gguf")

# NFC text with Latin ə, as typed on an Azerbaijani keyboard: the GGUF tokenizer has no normaliser (see gguf.py)
from tests.conftest import assert_same_tokenizer

TEXTS = [
    "Azərbaycan Respublikasının paytaxtı Bakı şəhəridir.",
    "İlham İşıq ışıqlı, ağ, öz, üç, çay, ğ, Ə və ə; 1918-ci il 28 may!",
    "Yeni sətir\nvə\ttab  iki boşluq <|endoftext|> sonra",
]
# How far a rounded file's logits may be from the f32 model's, in rounding units of the largest logit. f16 keeps
# 11 significant bits, so every weight moves by at most 2^-11 of itself; q8_0 stores each block of 32 values as
# multiples of (block max)/127, moving each by up to 2^-8 of its block's largest, which is several times a
# typical value's own size. A logit passes through a few matmuls in a row, each adding an error of that
# relative size. Measured on the tiny test model and a 2-layer one: f16 0.54 and 0.56 units, q8_0 1.7 and 5.1;
# the limits leave a margin of 3 or more. Check (a) first shows the file holds exactly the rounded weights, so a
# mis-encoded tensor is caught there at 1e-4, not here.
ROUNDING_UNIT = {"f32": 0.0, "f16": 2.0**-11, "q8_0": 2.0**-8}
TOLERANCE_UNITS = {"f32": 0, "f16": 4, "q8_0": 16}


@pytest.fixture(scope="module")
def exports(tiny_run, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny run exported once per outtype; each value is the .gguf file."""
    files = {}
    for outtype in OUTTYPES:
        out = tmp_path_factory.mktemp(outtype) / "azgpt-tiny"
        args = ["export", "--ckpt", str(tiny_run.ckpt), "--format", "gguf", "--out", str(out), "--outtype", outtype]
        assert main(args) == 0
        files[outtype] = out / f"azgpt-tiny-{outtype}.gguf"
    return files


@pytest.fixture(scope="module")
def checkpoint(tiny_run) -> Checkpoint:
    return load_checkpoint(tiny_run.ckpt)


def as_gguf_file(model: GPT) -> GPT:
    """The model as llama.cpp's gpt2 computes it: GPT-2's tanh GELU (the tiny run trained with exact GELU)."""
    model = copy.deepcopy(model)
    model.use_activation("gelu_tanh")
    return model


def stored_as(model: GPT, outtype: str) -> GPT:
    """``model`` with every matrix encoded to ``outtype`` and decoded back, as the file stores it."""
    model = as_gguf_file(model)
    qtype = gguf.GGMLQuantizationType[outtype.upper()]
    with torch.no_grad():
        for param in model.parameters():  # the tied head shares the embedding's parameter
            if param.dim() == 2:
                decoded = gguf.quants.dequantize(gguf.quants.quantize(param.numpy(), qtype), qtype)
                param.copy_(torch.from_numpy(np.asarray(decoded, dtype=np.float32)).reshape(param.shape))
    return model


def azgpt_logits(model: GPT, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0][0, :, : model.config.vocab_size]


def field(reader, key: str):
    return reader.fields[key].contents()


# ----------------------------------------------------------------------------------- files and gguf's reader


def test_export_writes_one_gguf_and_a_modelfile(exports: dict[str, Path]) -> None:
    for outtype, path in exports.items():
        assert sorted(p.name for p in path.parent.iterdir()) == ["Modelfile", f"azgpt-tiny-{outtype}.gguf"]
        assert [p.name for p in path.parent.parent.iterdir()] == ["azgpt-tiny"]  # no staging folder left
    sizes = {outtype: path.stat().st_size for outtype, path in exports.items()}
    assert sizes["f32"] > sizes["f16"] > sizes["q8_0"]


@pytest.mark.parametrize("outtype", OUTTYPES)
def test_gguf_reader_lists_every_tensor_with_its_shape_and_type(exports, checkpoint, outtype: str) -> None:
    model = checkpoint.build_model()
    C, L = model.config.n_embd, model.config.n_layer
    # llama.cpp's gpt2 tensors, written down from its loader (src/llama-model.cpp, LLM_ARCH_GPT2), with GGUF's
    # shapes (ne0 first, so a torch (out, in) matrix reads (in, out)); the head is tied, so no output.weight.
    block = {"attn_norm.weight": (C,), "attn_norm.bias": (C,), "attn_qkv.weight": (C, 3 * C),
             "attn_qkv.bias": (3 * C,), "attn_output.weight": (C, C), "attn_output.bias": (C,),
             "ffn_norm.weight": (C,), "ffn_norm.bias": (C,), "ffn_up.weight": (C, 4 * C), "ffn_up.bias": (4 * C,),
             "ffn_down.weight": (4 * C, C), "ffn_down.bias": (C,)}
    # The position table: the tiny run's 96 positions padded to 256 rows, llama.cpp's smallest context of >= 96.
    expected = {"token_embd.weight": (C, model.config.vocab_size), "position_embd.weight": (C, 256),
                "output_norm.weight": (C,), "output_norm.bias": (C,),
                **{f"blk.{i}.{name}": shape for i in range(L) for name, shape in block.items()}}
    reader = gguf.GGUFReader(exports[outtype])
    tensors = {t.name: t for t in reader.tensors}
    assert sorted(tensors) == sorted(expected)
    for name, tensor in tensors.items():
        assert tuple(int(n) for n in tensor.shape) == expected[name], name
        want = "F32" if len(expected[name]) == 1 else outtype.upper()
        assert tensor.tensor_type.name == want, name
    qkv = tensors["blk.0.attn_qkv.weight"]
    decoded = gguf.quants.dequantize(qkv.data, qkv.tensor_type).reshape(3 * C, C)
    weight = model.transformer.h[0].attn.c_attn.weight.detach().numpy()
    assert np.abs(decoded - weight).max() <= {"f32": 0, "f16": 1e-3, "q8_0": 1e-2}[outtype]
    table = tensors["position_embd.weight"]
    rows = gguf.quants.dequantize(table.data, table.tensor_type).reshape(256, C)
    trained = model.transformer.wpe.weight.detach().numpy()
    tolerance = {"f32": 0, "f16": 1e-3, "q8_0": 1e-2}[outtype]
    assert np.abs(rows[:96] - trained).max() <= tolerance
    assert (rows[96:] == rows[95]).all()  # past the block, every row is the last trained one


def test_gguf_metadata_describes_the_model_and_its_tokenizer(exports, checkpoint) -> None:
    reader = gguf.GGUFReader(exports["f32"])
    cfg, tokenizer = checkpoint.config, checkpoint.tokenizer
    assert field(reader, "general.architecture") == "gpt2"
    assert field(reader, "general.name") == "azgpt-tiny"
    assert field(reader, "general.file_type") == gguf.LlamaFileType.ALL_F32
    assert [field(reader, f"gpt2.{key}") for key in ("context_length", "embedding_length", "feed_forward_length",
                                                      "block_count", "attention.head_count")] == [
        256, cfg.n_embd, 4 * cfg.n_embd, cfg.n_layer, cfg.n_head]  # 256: the rows of the padded table
    assert "on a context of 96 tokens" in field(reader, "general.description")
    assert field(reader, "gpt2.attention.layer_norm_epsilon") == pytest.approx(1e-5)
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2"
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == cfg.vocab_size == len(vocab)
    assert all(vocab[token] == index for index, token in enumerate(tokens))
    types = field(reader, "tokenizer.ggml.token_type")
    assert types[0] == gguf.TokenType.CONTROL and tokens[0] == "<|endoftext|>"
    assert set(types[1:]) == {gguf.TokenType.NORMAL}
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    assert field(reader, "tokenizer.ggml.merges") == [m if isinstance(m, str) else " ".join(m) for m in merges]
    assert field(reader, "tokenizer.ggml.bos_token_id") == field(reader, "tokenizer.ggml.eos_token_id") == 0
    assert field(reader, "tokenizer.ggml.add_bos_token") is False
    assert "tokenizer.chat_template" not in reader.fields  # a base model has none
    assert field(reader, "general.file_type") == 0
    assert field(gguf.GGUFReader(exports["q8_0"]), "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0


def test_modelfile_points_at_the_file_with_stop_token_and_context(exports, checkpoint) -> None:
    text = (exports["f16"].parent / "Modelfile").read_text(encoding="utf-8")
    lines = text.splitlines()
    assert "FROM ./azgpt-tiny-f16.gguf" in lines
    assert 'TEMPLATE """{{ .Prompt }}"""' in lines
    assert 'PARAMETER stop "<|endoftext|>"' in lines
    assert "PARAMETER num_ctx 96" in lines  # the trained block, not the padded table
    assert "PARAMETER num_predict 96" in lines  # 200 by default, cut to one context
    assert "PARAMETER num_predict 200" in modelfile("m.gguf", "m", 512, None).splitlines()
    assert "PARAMETER temperature 0.8" in lines
    assert "#   ollama create azgpt-tiny -f Modelfile" in lines


def test_export_notes_what_the_tanh_gelu_changes(tiny_run, tmp_path: Path, capsys) -> None:
    assert main(["export", "--ckpt", str(tiny_run.ckpt), "--format", "gguf", "--out", str(tmp_path / "m")]) == 0
    captured = capsys.readouterr()
    assert "ollama create m -f Modelfile" in captured.out
    assert (tmp_path / "m" / "m-f16.gguf").is_file()  # f16 is the default
    assert "llama.cpp runs GELU in its tanh form" in captured.err and "logits move by at most" in captured.err
    assert "trained on 96-token blocks; its GGUF position table has 256 rows (positions 96-255 repeat " \
           "position 95)" in captured.err


# ----------------------------------------------------------------------------------- transformers reads it


@pytest.fixture(scope="module")
def transformers():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF file")
    return transformers


def hf_from_gguf(path: Path, transformers):
    # transformers maps gpt2.context_length to n_ctx, not to n_positions (the size of the position table), so
    # the table's rows are given again here; a GGUF with GPT-2's 1024 positions would not need it.
    rows = field(gguf.GGUFReader(path), "gpt2.context_length")
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, n_positions=rows).eval()


@pytest.mark.parametrize("outtype", OUTTYPES)
def test_transformers_loads_the_gguf_with_azgpts_logits(exports, checkpoint, transformers, outtype: str) -> None:
    model = checkpoint.build_model()
    ids = checkpoint.tokenizer.encode(" ".join(TEXTS)).ids[: model.config.block_size]
    hf = hf_from_gguf(exports[outtype], transformers)
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0]
    # (a) Against the weights exactly as the file holds them: the same function, to float32 rounding.
    exact = azgpt_logits(stored_as(model, outtype), ids)
    assert theirs.shape == exact.shape
    assert torch.allclose(theirs, exact, atol=1e-4, rtol=0)
    # (b) Against the f32 model (with the tanh GELU the file runs): only f16 / q8_0 rounding moves the logits.
    ours = azgpt_logits(as_gguf_file(model), ids)
    relative = (theirs - ours).abs().max().item() / ours.abs().max().item()
    tolerance = 1e-4 + TOLERANCE_UNITS[outtype] * ROUNDING_UNIT[outtype] * ours.abs().max().item()
    assert (theirs - ours).abs().max().item() <= tolerance, f"{relative:.2e} of the largest logit"


def test_transformers_tokenizer_from_the_gguf_gives_azgpts_ids(exports, checkpoint, transformers) -> None:
    ours = checkpoint.tokenizer
    path = exports["f16"]
    theirs = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert_same_tokenizer(ours, theirs, TEXTS)


# ----------------------------------------------------------------------------------- chat template


def test_a_fine_tuned_checkpoint_exports_its_chat_template(tiny_run, tmp_path: Path) -> None:
    """The tiny run given the chat template's tokens and the "azgpt" entry a fine-tune writes (300 + 4 tokens
    still fit the embedding, padded to 320 rows)."""
    raw = torch.load(tiny_run.ckpt, weights_only=True)
    tokenizer = DEFAULT_TEMPLATE.add_to_tokenizer(Tokenizer.from_str(raw["azgpt"]["tokenizer"]))
    raw["hyper_parameters"]["vocab_size"] = tokenizer.get_vocab_size()
    raw["azgpt"] = {**raw["azgpt"], "tokenizer": tokenizer.to_str(), "chat_template": DEFAULT_TEMPLATE.to_dict()}
    torch.save(raw, tmp_path / "tuned.ckpt")
    out = tmp_path / "tuned"
    assert main(["export", "--ckpt", str(tmp_path / "tuned.ckpt"), "--format", "gguf", "--out", str(out)]) == 0
    reader = gguf.GGUFReader(out / "tuned-f16.gguf")
    assert field(reader, "tokenizer.chat_template") == DEFAULT_TEMPLATE.jinja()
    assert field(reader, "tokenizer.ggml.eot_token_id") == tokenizer.token_to_id(DEFAULT_TEMPLATE.end_token)
    assert len(field(reader, "tokenizer.ggml.tokens")) == tokenizer.get_vocab_size()
    lines = (out / "Modelfile").read_text(encoding="utf-8").splitlines()
    assert f'PARAMETER stop "{DEFAULT_TEMPLATE.end_token}"' in lines
    assert any(line.startswith('TEMPLATE """<|endoftext|>{{- range .Messages }}') for line in lines)


def test_chat_model_carries_its_template(checkpoint, tmp_path: Path, transformers) -> None:
    chat = DEFAULT_TEMPLATE
    tokenizer = chat.add_to_tokenizer(checkpoint.tokenizer)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.get_vocab_size(), block_size=32, n_layer=1, n_head=2, n_embd=32))
    path = tmp_path / "chat-f32.gguf"
    write_gguf(model, tokenizer, path, "f32", name="chat", chat=chat)
    reader = gguf.GGUFReader(path)
    assert field(reader, "tokenizer.ggml.eot_token_id") == tokenizer.token_to_id("<|end|>")
    types = field(reader, "tokenizer.ggml.token_type")
    assert [types[tokenizer.token_to_id(t)] for t in ("<|user|>", "<|end|>")] == [gguf.TokenType.CONTROL] * 2
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    messages = [{"role": "system", "content": "Qısa cavab ver."}, {"role": "user", "content": "Salam!"},
                {"role": "assistant", "content": "Salam, necə kömək edə bilərəm?"},
                {"role": "user", "content": "Bakı?"}]
    rendered = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == chat.render([Message(**m) for m in messages], add_generation_prompt=True)
    assert rendered.startswith("<|endoftext|><|system|>Qısa cavab ver.<|end|><|user|>Salam!<|end|><|assistant|>")
    assert hf_tokenizer(rendered)["input_ids"] == tokenizer.encode(rendered).ids
    text = modelfile(path.name, "chat", 32, chat)
    assert '{{- range .Messages }}{{- if eq .Role "system" }}<|system|>{{- end }}' in text
    assert 'PARAMETER stop "<|end|>"' in text and 'PARAMETER stop "<|endoftext|>"' in text


# ----------------------------------------------------------------------------------- bad input


def test_unknown_format_and_outtype_are_refused(tiny_run, tmp_path: Path, capsys) -> None:
    base = ["export", "--ckpt", str(tiny_run.ckpt), "--out", str(tmp_path / "x")]
    assert main([*base, "--format", "onnx"]) == 2
    assert "format" in capsys.readouterr().err
    assert main([*base, "--format", "gguf", "--outtype", "q4_k_m"]) == 2
    assert "--outtype q4_k_m: the gguf package writes f32, f16, q8_0; for k-quants" in capsys.readouterr().err
    assert main([*base, "--outtype", "f16"]) == 2
    assert "--outtype applies to --format gguf" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_q8_0_needs_rows_in_blocks_of_32(checkpoint, tmp_path: Path) -> None:
    model = GPT(GPTConfig(vocab_size=checkpoint.config.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=48))
    with pytest.raises(AzGPTError, match=r"q8_0 stores rows in blocks of 32 .* rows of 48 .* use --outtype f16"):
        write_gguf(model, checkpoint.tokenizer, tmp_path / "m.gguf", "q8_0")
    assert not (tmp_path / "m.gguf").exists()
    write_gguf(model, checkpoint.tokenizer, tmp_path / "m.gguf", "f16")  # any row length works in f16


def test_existing_output_is_refused_unless_overwrite(exports, tiny_run, capsys) -> None:
    out = exports["f32"].parent
    args = ["export", "--ckpt", str(tiny_run.ckpt), "--format", "gguf", "--out", str(out), "--outtype", "f32"]
    assert main(args) == 2
    assert "not empty" in capsys.readouterr().err
    (out / "notes.txt").write_text("mine")
    assert main([*args, "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "azgpt-tiny-f32.gguf", "notes.txt"]
    assert [p.name for p in out.parent.iterdir()] == ["azgpt-tiny"]
    (out / "notes.txt").unlink()
    a_file = out.parent / "file.gguf"
    a_file.write_text("x")
    assert main([*args[:-4], "--out", str(a_file)]) == 2
    assert "is a file" in capsys.readouterr().err
    a_file.unlink()


def test_a_failed_export_leaves_nothing(tiny_run, tmp_path: Path, monkeypatch) -> None:
    import azgpt.use.gguf as gguf_export

    def fail_after_writing(model, tokenizer, path, *args, **kwargs):
        path.write_bytes(b"GGUF half")
        raise OSError("disk full")

    monkeypatch.setattr(gguf_export, "write_gguf", fail_after_writing)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(tiny_run.ckpt, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_missing_gguf_package_names_the_pip_command(tiny_run, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes the import fail
    assert main(["export", "--ckpt", str(tiny_run.ckpt), "--format", "gguf", "--out", str(tmp_path / "m")]) == 2
    assert "pip install 'azgpt[gguf]'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------- llama.cpp generates


@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_llama_cpp_greedy_generation_equals_azgpts(exports, checkpoint, outtype: str) -> None:
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python builds llama.cpp)")
    model = stored_as(checkpoint.build_model(), outtype)
    prompt = checkpoint.tokenizer.encode("Bakı şəhəri").ids
    ours = [int(t) for t in model.generate(torch.tensor([prompt]), 32, temperature=0.0)]
    llm = llama_cpp.Llama(model_path=str(exports[outtype]), n_ctx=model.config.block_size, n_threads=2,
                          verbose=False, logits_all=False)
    assert llm.tokenize("Bakı şəhəri".encode(), add_bos=False, special=True) == prompt
    theirs = []
    for token in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
        theirs.append(token)
        if len(theirs) == 32:
            break
    assert theirs == ours


# ----------------------------------------------------------------------------------- past the context in llama.cpp

LLAMA_CPP = Path(__file__).resolve().parents[1] / "node_llama_cpp"  # node-llama-cpp and the script that drives it
PROMPT = "Bakı şəhəri"


def llama_cpp_generate(path: Path, context_size: int, new_tokens: int) -> dict:
    """Greedy ids from a real llama.cpp (node-llama-cpp's prebuilt CPU build) given ``context_size``; the process
    must exit 0 (an abort inside llama.cpp, GGML_ASSERT, is SIGABRT)."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: tests/node_llama_cpp/generate.mjs runs llama.cpp with Node 18 or newer")
    if not (LLAMA_CPP / "node_modules" / "node-llama-cpp").is_dir():
        pytest.skip("node-llama-cpp is not installed: cd tests/node_llama_cpp && "
                    "NODE_LLAMA_CPP_SKIP_DOWNLOAD=true npm install (.ci/run does this where npm is installed)")
    done = subprocess.run([node, str(LLAMA_CPP / "generate.mjs"), str(path), str(context_size), str(new_tokens),
                           PROMPT], capture_output=True, text=True, timeout=300)
    if done.returncode == 3:
        pytest.skip(f"node-llama-cpp has no prebuilt llama.cpp for this machine: {done.stderr.strip()}")
    assert done.returncode == 0, f"llama.cpp exited with {done.returncode}:\n{done.stderr[-3000:]}"
    return json.loads(done.stdout.splitlines()[-1])


def random_modern(vocab_size: int, block_size: int, embedding_norm: bool = False) -> GPT:
    """A modern-recipe (llama in llama.cpp) model with random weights everywhere, zero_init off."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=1, n_head=2, n_embd=32,
                       **{**RECIPES["modern"], "zero_init": False, "embedding_norm": embedding_norm})
    return GPT(config).eval()


@pytest.mark.parametrize("context_size, new_tokens", [(200, 180), (256, 300)],
                         ids=["inside-a-larger-context", "past-the-whole-context"])
def test_llama_cpp_generates_past_a_gpt2_models_context(exports, checkpoint, context_size, new_tokens) -> None:
    """The GPT-2-recipe export (block 96) in llama.cpp with more context than it was trained on: positions past
    96 once aborted llama.cpp (GGML_ASSERT in the position table's lookup). The second case passes the context
    llama.cpp was given, where node-llama-cpp drops the oldest tokens as Ollama does."""
    block = checkpoint.config.block_size
    ran = llama_cpp_generate(exports["f32"], context_size, new_tokens)
    prompt = checkpoint.tokenizer.encode(PROMPT).ids
    assert ran["prompt"] == prompt
    assert len(ran["tokens"]) == new_tokens and len(prompt) + new_tokens > block + 64
    # Inside the trained block the file is still the model: llama.cpp's greedy ids are azgpt's.
    inside = block - len(prompt)
    model = stored_as(checkpoint.build_model(), "f32")
    ours = [int(t) for t in model.generate(torch.tensor([prompt]), inside, temperature=0.0)]
    assert ran["tokens"][:inside] == ours


@pytest.mark.parametrize("embedding_norm", [False, True], ids=["raw-embedding", "embedding-norm"])
def test_llama_cpp_generates_past_a_llama_models_context(checkpoint, tmp_path: Path, embedding_norm: bool) -> None:
    """A modern-recipe export has no position table: rotary positions go on past the block in llama.cpp. With
    embedding_norm the file's table holds the normalised rows, and llama.cpp must still agree."""
    model = random_modern(checkpoint.config.vocab_size, block_size=40, embedding_norm=embedding_norm)
    path = tmp_path / "modern-f32.gguf"
    write_gguf(model, checkpoint.tokenizer, path, "f32")
    ran = llama_cpp_generate(path, context_size=120, new_tokens=100)
    prompt = checkpoint.tokenizer.encode(PROMPT).ids
    assert ran["trainContextSize"] == 40 and len(ran["tokens"]) == 100
    inside = 40 - len(prompt)
    ours = [int(t) for t in model.generate(torch.tensor([prompt]), inside, temperature=0.0)]
    assert ran["tokens"][:inside] == ours
