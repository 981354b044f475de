"""A small decoder-only transformer, in plain PyTorch: GPT-2 by default, with the later improvements as options.

Parameter names follow Hugging Face's GPT2LMHeadModel (transformer.wte, transformer.h.{i}.attn.c_attn, ...)
so that the weights can be exported later. Generation supports a simple KV cache.

Each option of GPTConfig changes one thing and defaults to GPT-2's choice: rotary position embeddings instead of
a learned table (``position``), RMSNorm instead of LayerNorm (``norm``), normalised queries and keys (``qk_norm``),
a squared-ReLU or SwiGLU feed-forward network (``mlp``), a head separate from the token embedding
(``tie_embeddings``), residual projections that start at zero (``zero_init``), tanh-capped logits
(``logit_softcap``) and token embeddings normalised before the blocks (``embedding_norm``). ``RECIPES`` names the
combinations.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from azgpt.fast_ops import rms_norm, rotate, swiglu
from azgpt.targets import PAD_TARGET

# activation name -> nn.GELU's `approximate` argument
ACTIVATIONS = {"gelu": "none", "gelu_tanh": "tanh"}
POSITIONS = ("learned", "rope")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "relu2", "swiglu")
NORM_EPS = 1e-5  # LayerNorm's default, and RMSNorm's here so a Llama export can state one eps

# Named architectures: the settings each changes from GPTConfig's defaults (which are GPT-2's).
# "modern" is the combination later work (modded-nanogpt, nanochat) reports best that Llama can also express, so
# it exports as LlamaForCausalLM; bench/recipe.py measures it against GPT-2's (figures in the README).
RECIPES: dict[str, dict[str, Any]] = {
    "gpt2": {},
    "modern": {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "tie_embeddings": False, "zero_init": True,
               "embedding_norm": True},
}


@dataclass
class GPTConfig:
    """The model's architecture: everything needed to build a GPT whose weights fit.

    Args:
        vocab_size: vocabulary of the tokenizer (linked from the data in configs).
        block_size: context length (linked from the data in configs).
        n_layer: number of transformer blocks.
        n_head: attention heads per block.
        n_embd: width of the residual stream.
        dropout: dropout rate while training (a training setting: it may change on resume or fine-tune).
        bias: biases in the linear layers and LayerNorms.
        activation: the GELU of the ``gelu`` MLP: ``gelu`` (exact, erf) or ``gelu_tanh`` (GPT-2's approximation,
            about 3x slower in bf16 on CPUs and the default of checkpoints written before this setting).
        position: ``learned`` (GPT-2's table of position vectors) or ``rope`` (rotary embeddings).
        rope_theta: RoPE's base wavelength.
        norm: ``layernorm`` or ``rmsnorm`` (no mean subtraction, no bias).
        qk_norm: RMS-normalise each head's queries and keys before attention.
        mlp: ``gelu`` (with ``activation``) or ``relu2`` (squared ReLU), 4*n_embd wide; or ``swiglu`` (gated SiLU).
        tie_embeddings: the output head shares the token embedding's weights.
        zero_init: residual output projections (and an untied head) start at zero.
        logit_softcap: > 0: logits = cap * tanh(logits / cap); 0: off.
        embedding_norm: RMS-normalise each token's embedding (no gain) before the blocks. Its scale then cannot
            grow and drown what the blocks add to the residual stream, and its rows learn as fast as their
            direction allows. It acts on each row alone, so an untied model exports it folded into the table.
    """

    vocab_size: int = 8192
    block_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    dropout: float = 0.0
    bias: bool = False
    activation: str = "gelu"
    position: str = "learned"
    rope_theta: float = 10000.0
    norm: str = "layernorm"
    qk_norm: bool = False
    mlp: str = "gelu"
    tie_embeddings: bool = True
    zero_init: bool = False
    logit_softcap: float = 0.0
    embedding_norm: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        for name in ("bias", "qk_norm", "tie_embeddings", "zero_init", "embedding_norm"):
            if not isinstance(getattr(self, name), bool):  # "false" in a hand-written config.json is truthy
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)):
            raise ValueError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        for name, allowed in (("position", POSITIONS), ("norm", NORMS), ("mlp", MLPS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"position rope needs an even head size, got n_embd / n_head = {self.head_dim}")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta!r}")
        if not self.logit_softcap >= 0:
            raise ValueError(f"logit_softcap must be >= 0 (0: off), got {self.logit_softcap!r}")

    @classmethod
    def from_recipe(cls, recipe: str = "gpt2", **settings: Any) -> GPTConfig:
        """The config of a named recipe (see RECIPES); ``settings`` that are not None override it."""
        if recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
        return cls(**{**RECIPES[recipe], **{k: v for k, v in settings.items() if v is not None}})

    @property
    def mlp_hidden(self) -> int:
        """Width of the feed-forward layer: 4*n_embd, or for SwiGLU (three matrices instead of two) 8/3*n_embd
        rounded up to a multiple of 16, so both hold about the same number of weights."""
        if self.mlp == "swiglu":
            return (8 * self.n_embd // 3 + 15) // 16 * 16
        return 4 * self.n_embd

    @property
    def padded_vocab_size(self) -> int:
        """vocab_size rounded up to a multiple of 64 (friendlier matrix shapes)."""
        return (self.vocab_size + 63) // 64 * 64

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def rope_tables(head_dim: int, length: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin, each (length, head_dim), of rotary embeddings; frequency i rotates the pair of channels
    (i, i + head_dim/2), the layout of Hugging Face's Llama, so weights export without a permutation."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


class RMSNorm(nn.RMSNorm):
    """torch's RMSNorm (its weight, eps and state dict), computed by ``fast_ops.rms_norm``."""

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


def make_norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, eps=NORM_EPS)
    return nn.LayerNorm(config.n_embd, eps=NORM_EPS, bias=config.bias)


class KVCache:
    """Preallocated keys and values for every layer, shape (B, n_head, max_len, head_dim) each.

    `pos` is the number of positions already written; new tokens go to pos, pos+1, ...
    """

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_head: int,
        max_len: int,
        head_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        shape = (batch_size, n_head, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.batch_size = batch_size
        self.max_len = max_len
        self.pos = 0

    def reset(self) -> None:
        """Forget everything cached (the buffers are reused, stale values are never read)."""
        self.pos = 0


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused qkv projection."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.qk_norm = config.qk_norm
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, kv: tuple[Tensor, Tensor] | None = None, start: int = 0,
                rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """x (B,T,C) -> (B,T,C). With `kv` (one layer's cache buffers) x holds positions start..start+T-1;
        `rope` is the (cos, sin) of those positions when the model uses rotary embeddings."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if self.qk_norm:
            q, k = rms_norm(q, None, NORM_EPS), rms_norm(k, None, NORM_EPS)
        if rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
        dropout_p = self.dropout if self.training else 0.0

        if kv is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
        else:
            k_buf, v_buf = kv
            end = start + T
            k_buf[:, :, start:end] = k
            v_buf[:, :, start:end] = v
            k, v = k_buf[:, :, :end], v_buf[:, :, :end]
            if T == 1:
                mask = None  # a single newest query may see every cached key
            else:
                # SDPA's is_causal aligns the mask top-left, which is wrong when queries start at `start`:
                # query i sits at absolute position start+i and may see keys 0..start+i.
                mask = torch.ones(T, end, dtype=torch.bool, device=x.device).tril(diagonal=start)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)

        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward network: n_embd -> mlp_hidden -> GELU or ReLU² -> n_embd, or for SwiGLU
    silu(gate) * up with gate and up the two halves of c_fc's output."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.kind = config.mlp
        hidden = config.mlp_hidden
        self.c_fc = nn.Linear(config.n_embd, 2 * hidden if self.kind == "swiglu" else hidden, bias=config.bias)
        if self.kind == "gelu":
            self.gelu = nn.GELU(approximate=ACTIVATIONS[config.activation])
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.c_fc(x)
        if self.kind == "gelu":
            h = self.gelu(h)
        elif self.kind == "relu2":
            h = F.relu(h).square()
        else:
            h = swiglu(h)
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, kv: tuple[Tensor, Tensor] | None = None, start: int = 0,
                rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        x = x + self.attn(self.ln_1(x), kv, start, rope)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    """GPT language model: token embedding (plus a learned position table or rotary embeddings), blocks, head."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        layers = dict(wte=nn.Embedding(config.padded_vocab_size, config.n_embd))
        if config.position == "learned":
            layers["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        layers.update(
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=make_norm(config),
        )
        self.transformer = nn.ModuleDict(layers)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight  # weight tying: one Parameter
        if config.position == "rope":
            # Computed, not learned: kept out of the state dict.
            cos, sin = rope_tables(config.head_dim, config.block_size, config.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

        self.apply(self._init_weights)
        # Residual projections add into the stream 2*n_layer times; scale them down so the
        # residual stream's variance does not grow with depth (GPT-2 paper).
        resid_std = 0.02 / math.sqrt(2 * config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=resid_std)
        if config.zero_init:
            # Each block starts as the identity and the model as a uniform predictor; the gradients still
            # reach every projection (their inputs are not zero), so they leave zero on the first steps.
            for name, p in self.named_parameters():
                if name.endswith("c_proj.weight") or (name == "lm_head.weight" and not config.tie_embeddings):
                    nn.init.zeros_(p)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Number of parameters (a tied wte/lm_head weight counted once).

        With non_embedding=True the token and position embeddings are left out; note that a tied token
        embedding is also the lm_head weight, so this then excludes the head too.
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(layer.weight.numel() for name, layer in self.transformer.items() if name in ("wte", "wpe"))
        return n

    @staticmethod
    def normalise_embedding(rows: Tensor) -> Tensor:
        """Token embedding rows as ``embedding_norm`` feeds them to the blocks: RMS-normalised, no gain."""
        return rms_norm(rows, None, NORM_EPS)

    def use_activation(self, name: str) -> None:
        """Switch every GELU MLP to activation ``name`` (GELU has no weights, so trained weights stay valid)."""
        self.config = replace(self.config, activation=name)
        for block in self.transformer.h:
            if block.mlp.kind == "gelu":
                block.mlp.gelu = nn.GELU(approximate=ACTIVATIONS[name])

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward): 6*N + 12*n_layer*n_embd*block_size.

        N is the non-embedding parameter count plus the lm_head matmul; the second term is attention's
        QK^T and AV matmuls at full context (2 x 2*C*T forward per token and layer, twice that backward),
        the PaLM / nanoGPT convention for MFU: the causal mask's skipped half is counted as done.
        """
        cfg = self.config
        n = self.num_params(non_embedding=True) + (self.lm_head.weight.numel() if cfg.tie_embeddings else 0)
        return 6 * n + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size

    def _check_idx(self, idx: Tensor, start: int = 0) -> None:
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape (B, T), got {tuple(idx.shape)}")
        T = idx.size(1)
        if start + T > self.config.block_size:
            if start == 0:
                raise ValueError(
                    f"sequence length {T} exceeds block_size {self.config.block_size}"
                )
            raise ValueError(
                f"cached length {start} + new tokens {T} exceeds block_size {self.config.block_size}"
            )

    def _logits(self, idx: Tensor, cache: KVCache | None = None) -> Tensor:
        """Shared body of forward and forward_cached; returns logits (B, T, padded_vocab_size)."""
        start = 0 if cache is None else cache.pos
        T = idx.size(1)
        x = self.transformer.wte(idx)
        if self.config.embedding_norm:
            x = self.normalise_embedding(x)
        rope = None
        if self.config.position == "learned":
            x = x + self.transformer.wpe(torch.arange(start, start + T, dtype=torch.long, device=idx.device))
        else:
            rope = (self.rope_cos[start:start + T], self.rope_sin[start:start + T])
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            kv = None if cache is None else (cache.k[i], cache.v[i])
            x = block(x, kv, start, rope)
        logits = self.lm_head(self.transformer.ln_f(x))
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits / cap) if cap else logits

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """idx (B,T) int64 -> logits (B,T,padded_vocab_size) and mean cross-entropy loss if targets given.

        Target positions equal to ``PAD_TARGET`` are ignored by the loss.
        """
        self._check_idx(idx)
        logits = self._logits(idx)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=PAD_TARGET
            )
        return logits, loss

    def new_cache(self, batch_size: int) -> KVCache:
        """An empty KV cache sized for this model (block_size positions) on its device and dtype."""
        cfg = self.config
        w = self.transformer.wte.weight
        return KVCache(
            cfg.n_layer, batch_size, cfg.n_head, cfg.block_size, cfg.head_dim, device=w.device, dtype=w.dtype
        )

    def forward_cached(self, idx: Tensor, cache: KVCache) -> Tensor:
        """Run new tokens idx (B,T) at positions cache.pos..cache.pos+T-1, attending to everything cached.

        Writes their keys/values into `cache`, advances cache.pos, and returns logits (B,T,padded_vocab_size).
        """
        self._check_idx(idx, start=cache.pos)
        if idx.size(0) != cache.batch_size:
            raise ValueError(f"batch size {idx.size(0)} does not match the cache's {cache.batch_size}")
        logits = self._logits(idx, cache)
        cache.pos += idx.size(1)
        return logits

    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        stop_token: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> Iterator[Tensor]:
        """Yields one new token id tensor of shape (B,) per step. temperature == 0 -> greedy argmax.

        Logits of padded ids (>= vocab_size) are never sampled. Stops after max_new_tokens or when every
        row has produced stop_token; rows that already stopped keep yielding stop_token meanwhile.
        The prompt is cropped from the left to block_size if longer. When the cached sequence would
        exceed block_size, it falls back to recomputing on the last block_size tokens without cache.
        Arguments are validated immediately (not on the first next()). Put the model in eval() first
        if it has dropout.
        """
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature!r}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k!r}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
        if idx.dim() != 2 or idx.size(1) == 0:
            raise ValueError(f"idx must have shape (B, T) with T >= 1, got {tuple(idx.shape)}")
        # A generator function would only validate on the first next(); delegate so errors come now.
        return self._generate(
            idx, max_new_tokens, temperature, top_k, top_p, stop_token, use_cache, generator
        )

    @torch.no_grad()
    def _generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float,
        top_k: int | None,
        top_p: float | None,
        stop_token: int | None,
        use_cache: bool,
        generator: torch.Generator | None,
    ) -> Iterator[Tensor]:
        block_size = self.config.block_size
        idx = idx[:, -block_size:]
        cache = self.new_cache(idx.size(0)) if use_cache else None
        if cache is not None:
            logits = self.forward_cached(idx, cache)[:, -1, :]
        else:
            logits = self(idx)[0][:, -1, :]
        finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)

        for step in range(max_new_tokens):
            next_tok = self._sample(logits, temperature, top_k, top_p, generator)
            if stop_token is not None:
                next_tok = torch.where(finished, torch.full_like(next_tok, stop_token), next_tok)
                finished |= next_tok == stop_token
            yield next_tok
            if (stop_token is not None and bool(finished.all())) or step == max_new_tokens - 1:
                return

            idx = torch.cat([idx, next_tok[:, None]], dim=1)[:, -block_size:]
            if cache is not None and cache.pos < block_size:
                logits = self.forward_cached(next_tok[:, None], cache)[:, -1, :]
            else:
                # No cache, or the cache is full: recompute on the sliding window.
                cache = None
                logits = self(idx)[0][:, -1, :]

    def _sample(
        self,
        logits: Tensor,
        temperature: float,
        top_k: int | None,
        top_p: float | None,
        generator: torch.Generator | None,
    ) -> Tensor:
        """logits (B, padded_vocab_size) -> token ids (B,), never a padded id."""
        V = self.config.vocab_size
        logits = logits[:, :V].float()
        if temperature == 0:
            return logits.argmax(dim=-1)
        # Shifted so the top logit is 0, in float64: a tiny temperature (1e-45) drives the rest to -inf, never
        # to inf - inf = NaN, and leaves the likeliest token certain.
        logits = (logits.double() - logits.max(dim=-1, keepdim=True).values.double()) / temperature
        if top_k is not None and top_k < V:
            kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p is not None and top_p < 1.0:
            sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)
            sorted_probs = F.softmax(sorted_logits, dim=-1)
            # Drop a token if the tokens ranked above it already reach top_p; the top token never is.
            mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
            drop_sorted = mass_before >= top_p
            drop = drop_sorted.scatter(-1, sorted_idx, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
        probs = F.softmax(logits, dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
