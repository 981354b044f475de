"""One state-dict adapter per architecture, shared by every exporter (the HF folder and GGUF): azgpt's GPT as
Hugging Face's ``GPT2LMHeadModel`` or ``LlamaForCausalLM`` weights, and which of the two fits a model.

GPT-2's recipe maps onto GPT2LMHeadModel (Conv1D layouts, so the linear weights are transposed). A modern-recipe
model is Llama exactly: rotary embeddings (half-split pairs, as azgpt computes them), RMSNorm before
attention and MLP, a SwiGLU MLP, no position table, a head tied or not. azgpt's fused ``c_attn`` splits into
``q_proj``, ``k_proj``, ``v_proj``, and ``c_fc`` (gate then up) into ``gate_proj`` and ``up_proj``; nn.Linear
layouts need no transpose. A normalised token embedding (``embedding_norm``) acts on each row alone, so the
exported table holds the normalised rows; with a tied head the head would need the raw ones, so GPT-2 (always
tied) and a tied Llama cannot express it. QK-norm and logit soft-capping have no Llama equivalent. Models that
neither class expresses are refused rather than exported with different logits.
"""

from __future__ import annotations

from typing import Any

import torch

from azgpt.errors import AzGPTError
from azgpt.model import NORM_EPS, GPT, GPTConfig

# azgpt activation -> transformers' activation_function with the same formula
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new"}
CONV1D_WEIGHTS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
LAYER_NORMS = ("ln_1", "ln_2")


def gpt2_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """``model``'s weights under GPT2LMHeadModel's names and layouts.

    The embedding keeps only the tokenizer's ``vocab_size`` rows: azgpt pads it to a multiple of 64 but never
    samples a padded id, and dropping those rows keeps a Hugging Face model from ever producing an id its
    tokenizer lacks, while the logits of every real token stay the same. Missing biases (``bias=False``) are
    written as zeros, since GPT-2 always has them; the tied ``lm_head.weight`` is left out, as
    ``save_pretrained`` does.
    """
    cfg = model.config
    source = {name: tensor.detach().to("cpu", torch.float32) for name, tensor in model.state_dict().items()}
    out = {
        "transformer.wte.weight": source["transformer.wte.weight"][: cfg.vocab_size],
        "transformer.wpe.weight": source["transformer.wpe.weight"],
    }
    widths = {"attn.c_attn": 3 * cfg.n_embd, "attn.c_proj": cfg.n_embd, "mlp.c_fc": 4 * cfg.n_embd,
              "mlp.c_proj": cfg.n_embd}
    norms = [f"transformer.h.{i}.{ln}" for i in range(cfg.n_layer) for ln in LAYER_NORMS] + ["transformer.ln_f"]
    for name in norms:
        out[f"{name}.weight"] = source[f"{name}.weight"]
        out[f"{name}.bias"] = source.get(f"{name}.bias", torch.zeros(cfg.n_embd))
    for i in range(cfg.n_layer):
        for layer in CONV1D_WEIGHTS:
            name = f"transformer.h.{i}.{layer}"
            out[f"{name}.weight"] = source[f"{name}.weight"].t()
            out[f"{name}.bias"] = source.get(f"{name}.bias", torch.zeros(widths[layer]))
    return {name: tensor.contiguous().clone() for name, tensor in out.items()}


# What each Hugging Face class can express: the GPTConfig settings it needs.
GPT2_NEEDS = {"position": "learned", "norm": "layernorm", "mlp": "gelu", "qk_norm": False, "logit_softcap": 0.0,
              "tie_embeddings": True, "embedding_norm": False}
LLAMA_NEEDS = {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "qk_norm": False, "logit_softcap": 0.0}


def llama_needs(config: GPTConfig) -> dict[str, Any]:
    """LLAMA_NEEDS, and for a normalised embedding (folded into the table) an untied head."""
    return {**LLAMA_NEEDS, "tie_embeddings": False} if config.embedding_norm else LLAMA_NEEDS


def hf_architecture(config: GPTConfig) -> str:
    """``GPT2LMHeadModel`` or ``LlamaForCausalLM``: the Hugging Face class that computes what ``config`` does."""
    for name, needs in (("GPT2LMHeadModel", GPT2_NEEDS), ("LlamaForCausalLM", llama_needs(config))):
        if all(getattr(config, key) == value for key, value in needs.items()):
            return name
    closest = llama_needs(config) if config.position == "rope" else GPT2_NEEDS
    differ = ", ".join(f"{key} {getattr(config, key)!r} (needs {value!r})" for key, value in closest.items()
                       if getattr(config, key) != value)
    raise AzGPTError(f"this model cannot be exported to Hugging Face: neither GPT-2 nor Llama computes what it does "
                     f"({differ}); train with recipe gpt2 or modern, whose models export as GPT-2 and Llama")


def llama_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """``model``'s weights under LlamaForCausalLM's names, embedding and head cut to the tokenizer's vocab_size
    (and the embedding's rows normalised, where the model normalises them)."""
    cfg = model.config
    C, V = cfg.n_embd, cfg.vocab_size
    source = {name: tensor.detach().to("cpu", torch.float32) for name, tensor in model.state_dict().items()}
    embedding = source["transformer.wte.weight"][:V]
    if cfg.embedding_norm:
        embedding = model.normalise_embedding(embedding)
    out = {"model.embed_tokens.weight": embedding,
           "model.norm.weight": source["transformer.ln_f.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = source["lm_head.weight"][:V]
    for i in range(cfg.n_layer):
        ours, theirs = f"transformer.h.{i}.", f"model.layers.{i}."
        out[theirs + "input_layernorm.weight"] = source[ours + "ln_1.weight"]
        out[theirs + "post_attention_layernorm.weight"] = source[ours + "ln_2.weight"]
        for suffix in ("weight", "bias") if cfg.bias else ("weight",):
            q, k, v = source[f"{ours}attn.c_attn.{suffix}"].split(C, dim=0)
            gate, up = source[f"{ours}mlp.c_fc.{suffix}"].chunk(2, dim=0)
            out.update({
                f"{theirs}self_attn.q_proj.{suffix}": q, f"{theirs}self_attn.k_proj.{suffix}": k,
                f"{theirs}self_attn.v_proj.{suffix}": v,
                f"{theirs}self_attn.o_proj.{suffix}": source[f"{ours}attn.c_proj.{suffix}"],
                f"{theirs}mlp.gate_proj.{suffix}": gate, f"{theirs}mlp.up_proj.{suffix}": up,
                f"{theirs}mlp.down_proj.{suffix}": source[f"{ours}mlp.c_proj.{suffix}"],
            })
    return {name: tensor.contiguous().clone() for name, tensor in out.items()}


def gpt2_config(model: GPT, eot_id: int) -> dict[str, Any]:
    """``config.json`` for GPT2LMHeadModel with ``model``'s architecture."""
    cfg = model.config
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,  # the same, under the name llama.cpp's converter reads
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,  # 4 * n_embd
        "activation_function": HF_ACTIVATIONS[cfg.activation],
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": 0.0,  # azgpt has no dropout on attention weights
        "layer_norm_epsilon": NORM_EPS,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "use_cache": True,
        "torch_dtype": "float32",
    }


def llama_config(model: GPT, eot_id: int) -> dict[str, Any]:
    """``config.json`` for LlamaForCausalLM with ``model``'s architecture."""
    cfg = model.config
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.mlp_hidden,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_head,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": NORM_EPS,
        "rope_theta": cfg.rope_theta,  # transformers before v5
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},  # v5
        "attention_bias": cfg.bias,
        "mlp_bias": cfg.bias,
        "attention_dropout": 0.0,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": 0.02,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "use_cache": True,
        "torch_dtype": "float32",
    }

