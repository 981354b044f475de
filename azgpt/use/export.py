"""Export a checkpoint as a Hugging Face ``GPT2LMHeadModel`` folder, without needing ``transformers``
(a modern-recipe model as ``LlamaForCausalLM``; the weight mapping is in ``azgpt.use.adapters``).

The folder holds ``config.json``, ``generation_config.json`` (every end id: ``<|end|>`` too for a fine-tuned model),
``model.safetensors``, ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json`` and a model card
``README.md`` (front matter with ``license``, ``datasets`` and ``base_model`` where azgpt knows them); then
``GPT2LMHeadModel.from_pretrained(folder)`` and ``PreTrainedTokenizerFast.from_pretrained(folder)`` load it.

azgpt's GPT is GPT-2's architecture (pre-LayerNorm, LayerNorm eps 1e-5, tied head; GELU exact or GPT-2's tanh form),
so only the weight layout changes: GPT-2's ``Conv1D`` stores (in, out), the transpose of ``nn.Linear``.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any, Literal

from tokenizers import Tokenizer

from azgpt import __version__
from azgpt.atomic import atomic_output, check_target, create_exclusive
from azgpt.artifact import export_model_folder, load_model
from azgpt.checkpoint import Checkpoint, recorded_val_metrics
from azgpt.errors import AzGPTError
from azgpt.model import GPT
from azgpt.data.chat import TEMPLATE_TEXT_WARNING, ChatTemplate
from azgpt.data.hub import named_corpus
from azgpt.use.adapters import gpt2_config, gpt2_state_dict, hf_architecture, llama_config, llama_state_dict
from azgpt.data.tokenizer import EOT

EXPORTED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                  "tokenizer_config.json", "special_tokens_map.json", "README.md")
# The sample corpus and instructions ship with azgpt under its own licence (their ORIGIN.md; pyproject.toml's
# Apache-2.0, spelled as the Hub's model cards spell it).
SAMPLE_FOLDERS = ("sample_corpus", "sample_instructions")
AZGPT_LICENSE = "apache-2.0"
HUB_DATASET = re.compile(r"[\w.-]+/[\w.-]+")  # owner/name
CHAT_EXAMPLE = "Azərbaycanın paytaxtı haradır?"


def tokenizer_configs(block_size: int, chat_template: ChatTemplate | None = None
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
    """``tokenizer_config.json`` and ``special_tokens_map.json`` for ``PreTrainedTokenizerFast``; a fine-tuned
    model's template becomes their ``chat_template`` (for ``apply_chat_template``) and extra special tokens."""
    special: dict[str, Any] = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
    if chat_template is not None:
        special["additional_special_tokens"] = chat_template.special_tokens
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": block_size,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template.jinja()
    return config, special


def generation_config(eot_id: int, end_id: int | None = None) -> dict[str, Any]:
    """``generation_config.json``: ``generate`` stops at end of text and, for a fine-tuned model, at the end of
    the assistant's turn, where azgpt's ``chat`` stops."""
    eos = eot_id if end_id is None else [eot_id, end_id]
    return {"bos_token_id": eot_id, "eos_token_id": eos, "pad_token_id": eot_id}


def source_license(source: str) -> str | None:
    """The Hub licence id of one training source where azgpt knows it (a named corpus, or azgpt's samples)."""
    named = named_corpus(source)
    if named is not None:
        return named.hf_license
    path = Path(source)
    if any(p.name in SAMPLE_FOLDERS and p.parent.name == "azgpt" for p in (path, path.parent)):
        return AZGPT_LICENSE
    return None


def recorded_base_model(checkpoint: Checkpoint) -> str | None:
    """The ``init_from`` a fine-tune started from: in a ``.ckpt``'s hyperparameters or a model folder's meta.json."""
    hparams = checkpoint.raw.get("hyper_parameters") or {}
    training = (checkpoint.raw.get("meta") or {}).get("training") or {}
    return hparams.get("init_from") or training.get("init_from")


def card_metadata(data: dict[str, Any] | None, base_model: str | None) -> tuple[list[str], list[str]]:
    """The card's front-matter lines for ``license``, ``datasets`` and ``base_model``, and the card's lines on
    what the user must set (a licence azgpt does not know, a base model recorded as a local path)."""
    sources = [str(s) for s in (data or {}).get("source") or []]
    licenses = {source: source_license(source) for source in sources}
    known = set(licenses.values())
    todo = []
    if sources and None not in known and len(known) == 1:
        front = [f"license: {known.pop()}"]
    else:
        front = ["license: other  # set this: azgpt does not know one licence for the training data"]
        unknown = [Path(s).name if not named_corpus(s) else s for s, lic in licenses.items() if lic is None]
        why = (f"the licence of {', '.join(f'`{u}`' for u in unknown)} is not known to azgpt" if unknown else
               "the training data comes under several licences" if sources else "the training data is not recorded")
        todo.append(f"- `license` in the front matter is `other`: {why}. Set it before publishing this model.")
    datasets = []
    for corpus in (data or {}).get("corpora") or []:
        dataset = str(corpus.get("dataset") or "")
        if (named_corpus(str(corpus.get("corpus"))) or HUB_DATASET.fullmatch(dataset)) and dataset not in datasets:
            datasets.append(dataset)
    if datasets:
        front.append(f"datasets: [{', '.join(json.dumps(d) for d in datasets)}]")
    if base_model:
        front.append(f"base_model: {json.dumps(base_model, ensure_ascii=False)}  # the local model it was fine-tuned "
                     f"from; the base's Hub id once published")
        todo.append(f"- `base_model` is the path azgpt fine-tuned from (`{base_model}`); replace it with the base "
                    f"model's Hub id when you publish both.")
    return front, todo


def model_card(checkpoint: Checkpoint, model: GPT, folder_name: str) -> str:
    """A short ``README.md``: what the model is, what it was trained on, how well it did, how to load it."""
    cfg = model.config
    summary = checkpoint.summary
    hf_class = hf_architecture(cfg)
    style, tag = ("Llama", "llama") if hf_class == "LlamaForCausalLM" else ("GPT-2", "gpt2")
    padding = (cfg.padded_vocab_size - cfg.vocab_size) * cfg.n_embd * (1 if cfg.tie_embeddings else 2)
    params = model.num_params(non_embedding=False) - padding
    base_model = recorded_base_model(checkpoint)
    front, todo = card_metadata(summary.get("data"), base_model)
    lines = [
        "---",
        "language: az",
        front[0],
        "library_name: transformers",
        "pipeline_tag: text-generation",
        f"tags: [{tag}, azerbaijani, azgpt]",
        *front[1:],
        "---",
        "",
        f"# {folder_name}",
        "",
        f"A {style} style language model for Azerbaijani, trained from scratch with azgpt {__version__}.",
        "",
        "## Model",
        "",
        f"- {params:,} parameters ({params / 1e6:.2f} M): {_count(cfg.n_layer, 'layer')}, "
        f"{_count(cfg.n_head, 'attention head')}, width {cfg.n_embd}, context {cfg.block_size} tokens"
        + ("" if cfg.bias else "; trained without biases (the exported biases are zeros)"),
        f"- byte-level BPE tokenizer, {cfg.vocab_size:,} tokens, end of text `{EOT}`; it folds Cyrillic ә/Ә "
        f"into Latin ə/Ə and applies Unicode NFC",
        f"- trained for {checkpoint.raw.get('global_step', 'an unknown number of')} optimizer steps "
        f"(checkpoint `{checkpoint.path.name}`)" + (f", fine-tuned from `{base_model}`" if base_model else ""),
        "",
        "## Data",
        "",
        *_data_lines(summary.get("data")),
        "",
        "## Validation",
        "",
        *_metric_lines(recorded_val_metrics(checkpoint.raw)),
        "",
        "## Use",
        "",
        "```python",
        f"from transformers import {hf_class}, PreTrainedTokenizerFast",
        f'model = {hf_class}.from_pretrained("{folder_name}")',
        f'tokenizer = PreTrainedTokenizerFast.from_pretrained("{folder_name}")',
        # new tokens: at most half the context, so that prompt and reply stay inside the position table
        *(_chat_use_lines(min(100, cfg.block_size // 2)) if checkpoint.chat_template else [
            'ids = tokenizer("Azərbaycan", return_tensors="pt").input_ids',
            f"out = model.generate(ids, max_new_tokens={min(50, cfg.block_size // 2)}, do_sample=True, "
            "temperature=0.8, top_k=50)",
            "print(tokenizer.decode(out[0]))"]),
        "```",
        "",
        "A small model trained from scratch on a limited corpus: it imitates the style of its training text, "
        "knows little beyond it, and shares its biases.",
        "",
        *(_template_lines() if checkpoint.chat_template else []),
        *(["## Before publishing", "", *todo, ""] if todo else []),
    ]
    return "\n".join(lines)


def _chat_use_lines(max_new_tokens: int) -> list[str]:
    """The card's example for a fine-tuned model: a conversation through its chat template; generation stops at
    the end of the reply (generation_config.json)."""
    return [
        f'messages = [{{"role": "user", "content": "{CHAT_EXAMPLE}"}}]',
        "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, "
        'return_tensors="pt")',
        f"out = model.generate(**inputs, max_new_tokens={max_new_tokens}, do_sample=True, temperature=0.8, "
        "top_k=50)",
        'print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
    ]


# What a runtime does with template tokens typed inside a message (azgpt itself encodes them as plain text).
def _template_lines() -> list[str]:
    """The model card's chat section: how the template renders and what untrusted text can do to it."""
    return [
        "## Chat template",
        "",
        "Fine-tuned with azgpt's chat template: `tokenizer.apply_chat_template(messages, add_generation_prompt=True)` "
        "gives the ids it was trained on. In transformers (as in llama.cpp and Ollama) " + TEMPLATE_TEXT_WARNING,
        "",
    ]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _data_lines(data: dict[str, Any] | None) -> list[str]:
    if not data:
        return ["Not recorded in the checkpoint."]
    sources = [s if s.startswith("hf:") else Path(s).name for s in data.get("source") or []]
    lines = [f"- source: {', '.join(f'`{s}`' for s in sources) or 'unknown'}"]
    for corpus in data.get("corpora") or []:  # Hugging Face datasets: where they come from, under what licence
        where = " ".join(f"{k} `{corpus[k]}`" for k in ("dataset", "config", "split") if corpus.get(k))
        lines.append(f"- `{corpus['corpus']}`: {where}" + "".join(
            f"; {k} {corpus[k]}" for k in ("licence", "url") if corpus.get(k)))
    for split in ("train", "val"):
        tokens = data.get(f"{split}_tokens")
        if tokens is not None:
            lines.append(f"- {split} split: {tokens:,} tokens")
    if data.get("normalization"):
        lines.append(f"- normalisation: {data['normalization']}")
    return lines


def _metric_lines(metrics: dict[str, float]) -> list[str]:
    if not metrics:
        return ["No validation metrics in the checkpoint."]
    described = {"val_loss": "cross-entropy per token (nats)", "val_ppl": "perplexity per token",
                 "val_bpb": "bits per UTF-8 byte (comparable across tokenizers)"}
    return [f"- {name} = {value:.4f}: {described.get(name, '')}".rstrip(": ") for name, value in metrics.items()]


def write_hf_folder(model: GPT, tokenizer: Tokenizer, out: Path, card: str,
                    chat_template: ChatTemplate | None = None) -> None:
    """Write the Hugging Face files for ``model`` and ``tokenizer`` into ``out`` (created if needed).

    Every file is written by Python (``safetensors.torch.save`` to bytes, the tokenizer as a string), so each
    gets the same mode and a full disk is an ``OSError`` like any other.
    """
    try:
        from safetensors.torch import save
    except ImportError:
        raise AzGPTError("export needs the safetensors package: pip install safetensors") from None
    hf_class = hf_architecture(model.config)  # raises for what neither GPT-2 nor Llama computes
    eot_id = tokenizer.token_to_id(EOT)
    if hf_class == "LlamaForCausalLM":
        weights, config = llama_state_dict(model), llama_config(model, eot_id)
    else:
        weights, config = gpt2_state_dict(model), gpt2_config(model, eot_id)
    tokenizer_config, special_tokens = tokenizer_configs(model.config.block_size, chat_template)
    end_id = None
    if chat_template is not None:
        end_id = tokenizer.token_to_id(chat_template.end_token)
        if end_id is None:
            raise AzGPTError(f"the tokenizer lacks the chat template's end token {chat_template.end_token!r}")
    contents = {
        "model.safetensors": save(weights, metadata={"format": "pt"}),
        "config.json": _json_bytes(config),
        "generation_config.json": _json_bytes(generation_config(eot_id, end_id)),
        "tokenizer.json": tokenizer.to_str(pretty=True).encode("utf-8"),
        "tokenizer_config.json": _json_bytes(tokenizer_config),
        "special_tokens_map.json": _json_bytes(special_tokens),
        "README.md": card.encode("utf-8"),
    }
    out.mkdir(parents=True, exist_ok=True)
    for name, content in contents.items():
        with create_exclusive(out / name, replace_leftover=True) as handle:
            handle.write(content)


def export_checkpoint(checkpoint_path: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Export ``checkpoint_path`` into the folder ``out``, all at once: the files are written under a temporary
    folder name beside it and renamed into place when complete, so a failure leaves ``out`` as it was. Refuses
    a folder that holds files unless ``overwrite``."""
    out = Path(out)
    check_target(out, overwrite, "--out")
    checkpoint = load_model(checkpoint_path)
    model = checkpoint.build_model("cpu")
    card = model_card(checkpoint, model, out.resolve().name)
    stored = checkpoint.chat_template
    template = ChatTemplate.from_dict(stored, origin=str(checkpoint_path)) if stored else None
    with atomic_output(out, "--out", overwrite=overwrite) as folder:
        write_hf_folder(model, checkpoint.tokenizer, folder, card, template)
    return out


def _json_bytes(content: dict[str, Any]) -> bytes:
    return (json.dumps(content, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def export_command(ckpt: Path, out: Path, overwrite: bool = False,
                   format: Literal["hf", "gguf", "azgpt"] = "hf", outtype: str | None = None) -> int:
    """Write a model as a Hugging Face folder (GPT2LMHeadModel, or LlamaForCausalLM for the modern recipe:
    config.json, model.safetensors, tokenizer files, README.md model card; needs safetensors, not transformers),
    with --format gguf as one GGUF file for llama.cpp and Ollama plus an Ollama Modelfile (needs gguf), or with
    --format azgpt as azgpt's own model folder (what fit writes into its run folder when it ends).

    Args:
        ckpt: a model folder (lightning_logs/version_N/model) or a checkpoint written by azgpt fit.
        out: folder to write (new or empty).
        overwrite: write into a folder that already holds files.
        format: hf (a Hugging Face folder), gguf (llama.cpp / Ollama) or azgpt (a model folder).
        outtype: number format of a GGUF's weight matrices: f32, f16 (default) or q8_0.
    """
    if format == "gguf":
        from azgpt.use.gguf import DEFAULT_OUTTYPE, export_gguf

        path, notes = export_gguf(ckpt, out, outtype=outtype or DEFAULT_OUTTYPE, overwrite=overwrite)
        for note in notes:
            print(f"azgpt export: note: {note}", file=sys.stderr)
        name = path.parent.resolve().name.lower()
        print(f"exported {ckpt} to {path} (run it in Ollama: cd {out} && ollama create {name} -f Modelfile)")
        return 0
    if format == "azgpt":
        if outtype is not None:
            raise AzGPTError("--outtype applies to --format gguf; a model folder keeps the weights as trained")
        written = export_model_folder(ckpt, out, overwrite=overwrite)
        print(f"exported {ckpt} to {written}/ (every azgpt verb reads it: azgpt generate --ckpt {written})")
        return 0
    if format != "hf":
        raise AzGPTError(f"--format must be hf, gguf or azgpt, got {format!r}")
    if outtype is not None:
        raise AzGPTError("--outtype applies to --format gguf; the Hugging Face folder is always float32")
    written = export_checkpoint(ckpt, out, overwrite=overwrite)
    hf_class = json.loads((written / "config.json").read_text())["architectures"][0]
    print(f"exported {ckpt} to {written}/ (load it with {hf_class}.from_pretrained and "
          f"PreTrainedTokenizerFast.from_pretrained)")
    return 0
