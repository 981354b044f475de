"""Export a checkpoint as one GGUF file for llama.cpp and Ollama, plus an Ollama ``Modelfile`` beside it.

The file is written with the ``gguf`` package (llama.cpp's own writer, ``pip install 'azgpt[gguf]'``) under the
llama.cpp architecture that computes what the model does: ``gpt2`` for the GPT-2 recipe (pre-LayerNorm blocks,
learned positions, a fused QKV projection, a head tied to the token embedding) and ``llama`` for the modern one
(rotary embeddings, RMSNorm, SwiGLU, an untied head). The tokenizer travels inside as metadata: vocabulary,
merges, special tokens, and a chat template when the model was fine-tuned with one.

Two things a GGUF cannot say, so llama.cpp and Ollama differ from ``azgpt generate`` there:

- llama.cpp's ``gpt2`` computes GELU in GPT-2's tanh form. A model trained with exact GELU (azgpt's default)
  runs with that approximation; the export measures and prints what it changes in the logits.
- The tokenizer's normaliser (NFC, Cyrillic ә folded into Latin ə) has no GGUF key: prompts typed in NFC with
  Latin ə, as Azerbaijani keyboards write them, get the same ids; others may not.

Past the context: llama.cpp rounds every context up to a multiple of 256 tokens and looks a ``gpt2`` model's
positions up in its table without a bound check, so a sequence longer than the table aborts it
(``GGML_ASSERT(i01 >= 0 && i01 < ne01)``), whatever context was asked for. A ``gpt2`` export's table is therefore
padded to a multiple of 256 rows, each new row a copy of the last trained one (positions past the block all read
as its last position), and ``context_length`` says the padded size (llama.cpp refuses a table of another size).
The trained block is in the description, the ``Modelfile`` keeps Ollama to it, and the export says so. A
``llama`` export has no table: rotary positions go on past the block (untrained there, but no abort).
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from tokenizers import Tokenizer

from azgpt import __version__
from azgpt.atomic import atomic_output, check_target
from azgpt.artifact import load_model
from azgpt.data.chat import TEMPLATE_TEXT_WARNING, ChatTemplate
from azgpt.data.tokenizer import EOT
from azgpt.errors import AzGPTError
from azgpt.model import GPT, NORM_EPS
from azgpt.use.adapters import CONV1D_WEIGHTS, gpt2_state_dict, hf_architecture, llama_state_dict

OutType = Literal["f32", "f16", "q8_0"]  # the types gguf.quants can write that llama.cpp runs for both
OUTTYPES: tuple[str, ...] = get_args(OutType)
DEFAULT_OUTTYPE: OutType = "f16"
# llama.cpp's architecture for each Hugging Face class azgpt exports (azgpt.use.adapters.hf_architecture)
ARCHITECTURES = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama"}
TOKENIZER_PRE = "gpt-2"  # llama.cpp's name for the byte-level pre-tokenizer's split regex, which azgpt's uses
PROBE_TEXT = "Azərbaycan Respublikasının paytaxtı Bakı şəhəridir. Xəzər dənizinin sahilində yerləşir."
# Ollama's defaults for a model without its own: azgpt generate's temperature, a top-k/top-p cut that keeps a
# small model off its long tail, and as many new tokens as azgpt generate writes.
SAMPLING = {"temperature": 0.8, "top_k": 50, "top_p": 0.95, "repeat_penalty": 1.1, "num_predict": 200}
LLAMA_CPP_CONTEXT_PAD = 256  # llama.cpp allocates every context in multiples of this many tokens


def import_gguf() -> Any:
    """The ``gguf`` package, or an ``AzGPTError`` naming the pip command."""
    try:
        import gguf
    except ImportError:
        raise AzGPTError("--format gguf needs the gguf package: pip install 'azgpt[gguf]' "
                         "(or pip install gguf)") from None
    return gguf


def ollama_template(chat: ChatTemplate) -> str:
    """``chat`` in Go's text/template, which Ollama's ``TEMPLATE`` takes instead of Jinja (``chat.jinja()``)."""
    roles = "".join(f'{{{{- if eq .Role "{role}" }}}}{token}{{{{- end }}}}' for role, token in chat.role_tokens.items())
    return (f"{EOT}{{{{- range .Messages }}}}{roles}{{{{ .Content }}}}{chat.end_token}{{{{- end }}}}"
            f"{chat.role_tokens['assistant']}")


def gguf_architecture(model: GPT) -> str:
    """``gpt2`` or ``llama``: the llama.cpp architecture that computes what ``model`` does."""
    return ARCHITECTURES[hf_architecture(model.config)]  # hf_architecture refuses what neither computes


def gguf_tensors(model: GPT) -> dict[str, np.ndarray]:
    """``model``'s weights under llama.cpp's names for its architecture, as float32 arrays in ``nn.Linear``'s
    (out, in) layout; a tied head is left out (llama.cpp then reuses ``token_embd``)."""
    gguf = import_gguf()
    arch = gguf_architecture(model)
    if arch == "gpt2":
        # The Hugging Face layout (the vocabulary cut to the tokenizer's size, zero biases where the model has
        # none: llama.cpp's gpt2 requires them) with GPT-2's Conv1D transpose undone.
        source = {name: tensor.t() if name.removesuffix(".weight").endswith(CONV1D_WEIGHTS) else tensor
                  for name, tensor in gpt2_state_dict(model).items()}
    else:
        heads = model.config.n_head
        source = {name: rope_pairs_adjacent(tensor, heads) if name.endswith(("q_proj.weight", "k_proj.weight"))
                  else tensor for name, tensor in llama_state_dict(model).items()}
    names = gguf.TensorNameMap(gguf.MODEL_ARCH[arch.upper()], model.config.n_layer)
    tensors = {}
    for hf_name, tensor in source.items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise RuntimeError(f"gguf has no {arch} name for {hf_name}")  # a change in gguf's TensorNameMap
        if hf_name == "transformer.wpe.weight":
            tensor = pad_positions(tensor, context_length(model))
        tensors[name] = tensor.contiguous().numpy()
    return tensors


def context_length(model: GPT) -> int:
    """The GGUF's ``context_length``: for ``gpt2`` the rows of its padded position table (the block rounded up to
    a multiple of 256, the most llama.cpp allocates for a context of at most that many tokens); for ``llama``,
    which has no table, the block."""
    block = model.config.block_size
    if gguf_architecture(model) != "gpt2":
        return block
    return -(-block // LLAMA_CPP_CONTEXT_PAD) * LLAMA_CPP_CONTEXT_PAD


def pad_positions(table: torch.Tensor, rows: int) -> torch.Tensor:
    """``table`` grown to ``rows`` rows by repeating its last one: past the trained block every position looks
    like the last trained one. Text there is beyond what the model learned, but llama.cpp runs instead of
    aborting."""
    return torch.cat([table, table[-1:].expand(rows - len(table), -1)])


def context_note(model: GPT) -> str | None:
    """What the export did to a ``gpt2`` model's position table, or None when it did nothing."""
    block, rows = model.config.block_size, context_length(model)
    if rows == block:
        return None
    return (f"the model was trained on {block}-token blocks; its GGUF position table has {rows} rows (positions "
            f"{block}-{rows - 1} repeat position {block - 1}) so that llama.cpp, which allocates contexts in "
            f"multiples of {LLAMA_CPP_CONTEXT_PAD}, does not abort past {block} tokens; text there is beyond its "
            f"training. Give llama.cpp at most -c {rows}; the Modelfile keeps Ollama to {block}")


def rope_pairs_adjacent(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder the rows of a query or key projection for llama.cpp's ``llama``, which rotates channels
    (2i, 2i+1) of each head where azgpt (like Hugging Face's Llama) rotates (i, i + head_dim/2): within every
    head, output row 2i + j is row j * head_dim/2 + i, so the same pairs meet the same angles."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, -1).transpose(1, 2).reshape(weight.shape)


def storage_type(tensor: np.ndarray, outtype: OutType) -> str:
    """The GGML type a tensor is stored in: norms and biases (1-D) stay f32, as llama.cpp's converter keeps
    them; matrices take ``outtype``."""
    return "f32" if tensor.ndim == 1 else outtype


def check_outtype_name(outtype: str) -> None:
    if outtype not in OUTTYPES:
        raise AzGPTError(f"--outtype {outtype}: the gguf package writes {', '.join(OUTTYPES)}; for k-quants such "
                         f"as q4_k_m, export f16 and run llama.cpp's llama-quantize on that file")


def check_outtype(tensors: dict[str, np.ndarray], outtype: OutType) -> None:
    """Refuse a quantisation the writer cannot apply to every matrix of this model, before writing anything."""
    check_outtype_name(outtype)
    gguf = import_gguf()
    qtype = gguf.GGMLQuantizationType[outtype.upper()]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    for name, tensor in tensors.items():
        if storage_type(tensor, outtype) == outtype and tensor.shape[-1] % block:
            raise AzGPTError(f"--outtype {outtype} stores rows in blocks of {block} values, but {name} has rows of "
                             f"{tensor.shape[-1]} (not a multiple of {block}): use --outtype f16")


def stored_weights(tensors: dict[str, np.ndarray], outtype: OutType) -> dict[str, tuple[np.ndarray, Any]]:
    """Each tensor encoded for the file, with its GGML type (``gguf.quants.quantize`` does the encoding)."""
    gguf = import_gguf()
    stored = {}
    for name, tensor in tensors.items():
        qtype = gguf.GGMLQuantizationType[storage_type(tensor, outtype).upper()]
        stored[name] = (gguf.quants.quantize(tensor, qtype), qtype)
    return stored


def vocabulary(tokenizer: Tokenizer, size: int) -> tuple[list[str], list[int], list[str]]:
    """Tokens (in id order, byte-level spelling as in ``tokenizer.json``), their llama.cpp token types, and the
    merges as ``"left right"``. Rows of a larger model vocabulary get unused ``[PAD<id>]`` tokens."""
    gguf = import_gguf()
    by_id = {index: token for token, index in tokenizer.get_vocab(with_added_tokens=True).items()}
    if sorted(by_id) != list(range(len(by_id))):
        raise AzGPTError("the checkpoint's tokenizer has gaps in its token ids; GGUF needs ids 0..N-1")
    added = tokenizer.get_added_tokens_decoder()
    tokens, types = [], []
    for index in range(size):
        if index in by_id:
            tokens.append(by_id[index])
            token_type = gguf.TokenType.NORMAL
            if index in added:
                token_type = gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED
        else:
            tokens.append(f"[PAD{index}]")
            token_type = gguf.TokenType.UNUSED
        types.append(int(token_type))
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    return tokens, types, [m if isinstance(m, str) else " ".join(m) for m in merges]


def write_gguf(model: GPT, tokenizer: Tokenizer, path: Path, outtype: OutType = DEFAULT_OUTTYPE,
               name: str = "azgpt", chat: ChatTemplate | None = None) -> None:
    """Write ``model`` and ``tokenizer`` as the GGUF file ``path`` (not atomic: see ``export_gguf``)."""
    gguf = import_gguf()
    cfg = model.config
    tensors = gguf_tensors(model)
    check_outtype(tensors, outtype)
    eot_id = tokenizer.token_to_id(EOT)
    tokens, token_types, merges = vocabulary(tokenizer, cfg.vocab_size)

    arch = gguf_architecture(model)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_description(f"Azerbaijani GPT trained from scratch with azgpt {__version__}, on a context of "
                           f"{cfg.block_size} tokens" + ("" if context_length(model) == cfg.block_size else
                           f" (the position table repeats its last row up to {context_length(model)})"))
    writer.add_file_type(int(gguf.LlamaFileType[{"f32": "ALL_F32", "f16": "MOSTLY_F16",
                                                  "q8_0": "MOSTLY_Q8_0"}[outtype]]))
    if outtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(context_length(model))
    writer.add_embedding_length(cfg.n_embd)
    writer.add_feed_forward_length(cfg.mlp_hidden)
    writer.add_block_count(cfg.n_layer)
    writer.add_head_count(cfg.n_head)
    if arch == "gpt2":
        writer.add_layer_norm_eps(NORM_EPS)
    else:
        writer.add_head_count_kv(cfg.n_head)
        writer.add_layer_norm_rms_eps(NORM_EPS)
        writer.add_rope_dimension_count(cfg.head_dim)
        writer.add_rope_freq_base(cfg.rope_theta)
        writer.add_vocab_size(cfg.vocab_size)

    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(TOKENIZER_PRE)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(eot_id)
    writer.add_eos_token_id(eot_id)
    writer.add_add_bos_token(False)  # azgpt feeds a prompt as typed, with no token in front
    writer.add_add_eos_token(False)
    if chat is not None:
        writer.add_chat_template(chat.jinja())
        end_id = tokenizer.token_to_id(chat.end_token)
        if end_id is None:
            raise AzGPTError(f"the tokenizer lacks the chat template's end token {chat.end_token!r}")
        writer.add_eot_token_id(end_id)

    for tensor_name, (data, qtype) in stored_weights(tensors, outtype).items():
        writer.add_tensor(tensor_name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def modelfile(gguf_name: str, name: str, block_size: int, chat: ChatTemplate | None) -> str:
    """An Ollama ``Modelfile`` for the GGUF file ``gguf_name`` beside it; ``name`` is the suggested model name."""
    name = name.lower()  # Ollama's model names are lower case
    template = ollama_template(chat) if chat else "{{ .Prompt }}"
    stops = [EOT] + ([chat.end_token] if chat else [])
    warning = textwrap.wrap(f"In Ollama and llama.cpp {TEMPLATE_TEXT_WARNING}", 110) if chat else []
    lines = [
        f"# Ollama model file written by azgpt {__version__}. In this folder:",
        f"#   ollama create {name} -f Modelfile",
        f'#   ollama run {name} "Azərbaycan"',
        *[f"# {line}" for line in warning],
        f"FROM ./{gguf_name}",
        f'TEMPLATE """{template}"""',
        *[f'PARAMETER stop "{stop}"' for stop in stops],
        "# num_ctx: the context it was trained on. When a sequence fills it, Ollama drops the older half and goes",
        "# on, so positions stay inside it; num_predict: at most one context of new tokens.",
        f"PARAMETER num_ctx {block_size}",
        *[f"PARAMETER {key} {min(value, block_size) if key == 'num_predict' else value}"
          for key, value in SAMPLING.items()],
    ]
    return "\n".join(lines) + "\n"


def gelu_note(model: GPT, tokenizer: Tokenizer) -> str | None:
    """For a model trained with exact GELU: what running it with llama.cpp's tanh GELU changes, on a probe."""
    if model.config.mlp != "gelu" or model.config.activation == "gelu_tanh":
        return None
    ids = tokenizer.encode(PROBE_TEXT).ids[: model.config.block_size]
    idx = torch.tensor([ids])
    vocab = model.config.vocab_size
    trained = model.config.activation
    with torch.no_grad():
        exact = model(idx)[0][0, :, :vocab]
        model.use_activation("gelu_tanh")
        try:
            tanh = model(idx)[0][0, :, :vocab]
        finally:
            model.use_activation(trained)
    agree = (exact.argmax(-1) == tanh.argmax(-1)).float().mean().item()
    return (f"llama.cpp runs GELU in its tanh form and this model was trained with exact GELU: on a "
            f"{len(ids)}-token probe the logits move by at most {(exact - tanh).abs().max().item():.1e} and the "
            f"likeliest next token stays the same at {agree:.0%} of positions")


def export_gguf(checkpoint_path: str | Path, out: str | Path, outtype: OutType = DEFAULT_OUTTYPE,
                overwrite: bool = False) -> tuple[Path, list[str]]:
    """Export ``checkpoint_path`` into the folder ``out`` as ``<out name>-<outtype>.gguf`` and ``Modelfile``.

    Written all at once (``azgpt.atomic.atomic_output``): a failure leaves ``out`` as it was. Returns the GGUF
    file's path and notes for the user: what llama.cpp's tanh GELU changes (a model trained with exact GELU), and
    the padded position table (``gpt2``).
    """
    import_gguf()
    out = Path(out)
    check_target(out, overwrite, "--out")  # before the slow part; atomic_output checks again
    check_outtype_name(outtype)
    checkpoint = load_model(checkpoint_path)
    model = checkpoint.build_model("cpu")
    gguf_architecture(model)  # refuses, before anything is written, what neither gpt2 nor llama computes
    stored = checkpoint.chat_template
    chat = ChatTemplate.from_dict(stored, origin=str(checkpoint_path)) if stored else None
    name = out.resolve().name
    gguf_name = f"{name}-{outtype}.gguf"
    with atomic_output(out, "--out", overwrite=overwrite) as folder:
        write_gguf(model, checkpoint.tokenizer, folder / gguf_name, outtype, name=name, chat=chat)
        text = modelfile(gguf_name, name, model.config.block_size, chat)
        (folder / "Modelfile").write_text(text, encoding="utf-8")
    notes = [gelu_note(model, checkpoint.tokenizer), context_note(model)]
    return out / gguf_name, [note for note in notes if note]
