"""A small GPT-2 style decoder-only transformer, in plain PyTorch.

Parameter names follow Hugging Face's GPT2LMHeadModel (transformer.wte, transformer.h.{i}.attn.c_attn, ...)
so that the weights can be exported later. Generation supports a simple KV cache.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


# activation name -> nn.GELU's `approximate` argument
ACTIVATIONS = {"gelu": "none", "gelu_tanh": "tanh"}


@dataclass
class GPTConfig:
    """Model hyperparameters."""

    vocab_size: int = 8192
    block_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    dropout: float = 0.0
    bias: bool = False
    # "gelu" is exact (erf); "gelu_tanh" is GPT-2's tanh approximation, about 3x slower in bf16 on CPUs
    # (5% of a training step on the reference config) and the default of checkpoints written before this setting.
    activation: str = "gelu"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)):
            raise ValueError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")

    @property
    def padded_vocab_size(self) -> int:
        """vocab_size rounded up to a multiple of 64 (friendlier matrix shapes)."""
        return (self.vocab_size + 63) // 64 * 64

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


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
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, kv: tuple[Tensor, Tensor] | None = None, start: int = 0) -> Tensor:
        """x (B,T,C) -> (B,T,C). With `kv` (one layer's cache buffers) x holds positions start..start+T-1."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
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
    """Position-wise feed-forward network: n_embd -> 4*n_embd -> GELU -> n_embd."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate=ACTIVATIONS[config.activation])
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, kv: tuple[Tensor, Tensor] | None = None, start: int = 0) -> Tensor:
        x = x + self.attn(self.ln_1(x), kv, start)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    """GPT-2 style language model with a language-model head tied to the token embedding."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying: one Parameter

        self.apply(self._init_weights)
        # Residual projections add into the stream 2*n_layer times; scale them down so the
        # residual stream's variance does not grow with depth (GPT-2 paper).
        resid_std = 0.02 / math.sqrt(2 * config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=resid_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Number of parameters (the tied wte/lm_head weight counted once).

        With non_embedding=True the token and position embeddings are left out; note that the token
        embedding is also the lm_head weight, so this excludes the head too.
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wte.weight.numel() + self.transformer.wpe.weight.numel()
        return n

    def use_activation(self, name: str) -> None:
        """Switch every MLP to activation ``name`` (GELU has no weights, so trained weights stay valid)."""
        self.config = replace(self.config, activation=name)
        for block in self.transformer.h:
            block.mlp.gelu = nn.GELU(approximate=ACTIVATIONS[name])

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward): 6*N + 6*n_layer*n_embd*block_size.

        N is the non-embedding parameter count plus the lm_head matmul; the second term is attention's
        QK^T and AV matmuls at full context.
        """
        cfg = self.config
        n = self.num_params(non_embedding=True) + self.lm_head.weight.numel()
        return 6 * n + 6 * cfg.n_layer * cfg.n_embd * cfg.block_size

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
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for i, block in enumerate(self.transformer.h):
            kv = None if cache is None else (cache.k[i], cache.v[i])
            x = block(x, kv, start)
        x = self.transformer.ln_f(x)
        return self.lm_head(x)

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """idx (B,T) int64 -> logits (B,T,padded_vocab_size) and mean cross-entropy loss if targets given.

        Target positions equal to -1 are ignored by the loss.
        """
        self._check_idx(idx)
        logits = self._logits(idx)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1
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
