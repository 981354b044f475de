"""GPTConfig's options beyond GPT-2 (RoPE, RMSNorm, QK-norm, ReLU²/SwiGLU, untied head, zero init, soft-cap,
normalised token embeddings)."""

from __future__ import annotations

import re

import pytest
import torch

from azgpt.fast_ops import rotate
from azgpt.model import GPT, RECIPES, GPTConfig, rope_tables

SMALL = dict(vocab_size=100, block_size=16, n_layer=2, n_head=2, n_embd=32)
OPTIONS = [
    {},
    {"position": "rope"},
    {"norm": "rmsnorm"},
    {"qk_norm": True},
    {"mlp": "relu2"},
    {"mlp": "swiglu"},
    {"tie_embeddings": False},
    {"zero_init": True},
    {"logit_softcap": 15.0},
    {"embedding_norm": True},
    {"bias": True, "norm": "rmsnorm", "mlp": "swiglu", "position": "rope"},
    RECIPES["modern"],
    {**RECIPES["modern"], "qk_norm": True, "logit_softcap": 15.0},
]


def _name(option: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in option.items()) or "gpt2"


@pytest.mark.parametrize("option", OPTIONS, ids=_name)
def test_each_option_trains_forward_and_backward(option) -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL, **option))
    idx = torch.randint(0, 100, (3, 16))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 16, model.config.padded_vocab_size)
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape, name
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("option", [{"position": "rope"}, {"position": "rope", "qk_norm": True},
                                    {**RECIPES["modern"], "qk_norm": True, "logit_softcap": 10.0}], ids=_name)
def test_rope_with_kv_cache_equals_the_uncached_forward(option) -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL, **{**option, "zero_init": False})).eval()
    idx = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        full = model(idx)[0]
        cache = model.new_cache(2)
        parts = [model.forward_cached(idx[:, :5], cache), model.forward_cached(idx[:, 5:6], cache),
                 model.forward_cached(idx[:, 6:], cache)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)
    greedy_cached = torch.stack(list(model.generate(idx[:, :3], 10, temperature=0)), dim=1)
    greedy_uncached = torch.stack(list(model.generate(idx[:, :3], 10, temperature=0, use_cache=False)), dim=1)
    assert torch.equal(greedy_cached, greedy_uncached)


def test_rope_scores_depend_on_relative_position_only() -> None:
    cos, sin = rope_tables(8, 32, 10000.0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    def score(i: int, j: int) -> torch.Tensor:
        return (rotate(q, cos[i:i + 1], sin[i:i + 1]) * rotate(k, cos[j:j + 1], sin[j:j + 1])).sum()
    torch.testing.assert_close(score(3, 1), score(20, 18))
    assert not torch.allclose(score(3, 1), score(3, 2))


def test_defaults_are_gpt2_and_keep_the_state_dict() -> None:
    assert GPTConfig.from_recipe("gpt2", **SMALL) == GPTConfig(**SMALL)
    keys = set(GPT(GPTConfig(**SMALL)).state_dict())
    assert "transformer.wpe.weight" in keys and "transformer.h.0.ln_1.bias" not in keys
    assert "transformer.h.0.ln_1.weight" in keys


def test_recipe_settings_override_and_bad_values_are_refused() -> None:
    cfg = GPTConfig.from_recipe("modern", **SMALL, qk_norm=True, mlp=None)
    assert (cfg.position, cfg.norm, cfg.mlp, cfg.tie_embeddings, cfg.qk_norm) == ("rope", "rmsnorm", "swiglu",
                                                                                  False, True)
    with pytest.raises(ValueError, match="recipe must be one of"):
        GPTConfig.from_recipe("llama3")
    for bad, message in (({"position": "alibi"}, "position must be one of learned, rope, got 'alibi'"),
                         ({"norm": "batchnorm"}, "norm must be one of layernorm, rmsnorm, got 'batchnorm'"),
                         ({"mlp": "geglu"}, "mlp must be one of gelu, relu2, swiglu, got 'geglu'"),
                         ({"logit_softcap": -1.0}, "logit_softcap must be >= 0 (0: off), got -1.0"),
                         ({"embedding_norm": "false"}, "embedding_norm must be true or false, got 'false'"),
                         ({"qk_norm": 1}, "qk_norm must be true or false, got 1"),
                         ({"position": "rope", "n_embd": 30, "n_head": 2},
                          "position rope needs an even head size, got n_embd / n_head = 15")):
        with pytest.raises(ValueError, match=re.escape(message)):
            GPTConfig(**{**SMALL, **bad})


def test_untied_head_zero_init_and_softcap() -> None:
    model = GPT(GPTConfig(**SMALL, tie_embeddings=False, zero_init=True))
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert "lm_head.weight" in dict(model.named_parameters())
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight") or name == "lm_head.weight":
            assert not p.any(), name
    logits, loss = model(torch.randint(0, 100, (2, 8)), torch.randint(0, 100, (2, 8)))
    assert not logits.any()  # a uniform predictor to start with
    torch.testing.assert_close(loss, torch.log(torch.tensor(float(model.config.padded_vocab_size))))
    capped = GPT(GPTConfig(**SMALL, logit_softcap=2.0))
    with torch.no_grad():
        capped.lm_head.weight.mul_(1000)
    assert capped(torch.randint(0, 100, (1, 8)))[0].abs().max() <= 2.0


def test_swiglu_holds_about_as_many_weights_as_the_gelu_mlp() -> None:
    wide = {**SMALL, "n_embd": 256}
    gelu = GPT(GPTConfig(**wide)).transformer.h[0].mlp
    swiglu = GPT(GPTConfig(**wide, mlp="swiglu")).transformer.h[0].mlp
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert abs(n(swiglu) - n(gelu)) / n(gelu) < 0.02


def test_embedding_norm_feeds_the_blocks_rows_of_rms_one_whatever_the_embeddings_scale() -> None:
    """With embedding_norm the blocks see each token's direction only: scaling rows changes no logit (untied head),
    where without it the same scaling does (the embedding's size competes with what the blocks add)."""
    idx = torch.randint(0, 100, (2, 8))
    scale = torch.rand(GPTConfig(**SMALL).padded_vocab_size, 1) * 20 + 0.5
    for normalised in (True, False):
        torch.manual_seed(0)
        model = GPT(GPTConfig(**SMALL, tie_embeddings=False, embedding_norm=normalised)).eval()
        with torch.no_grad():
            model.transformer.wte.weight.normal_()  # rows of RMS about 1, where the norm's eps is negligible
            before = model(idx)[0]
            model.transformer.wte.weight.mul_(scale)
            after = model(idx)[0]
        assert torch.allclose(before, after, atol=1e-4) == normalised, normalised
    rows = torch.randn(5, 32) * 7
    torch.testing.assert_close(GPT.normalise_embedding(rows).pow(2).mean(-1), torch.ones(5), atol=1e-4, rtol=0)
