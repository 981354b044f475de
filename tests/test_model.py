"""Fast tests for azgpt.model: config, forward/loss, init, causality and generation."""

from __future__ import annotations

import math

import pytest
import torch

from azgpt.model import GPT, GPTConfig
from azgpt.targets import PAD_TARGET


def small_config(**overrides) -> GPTConfig:
    kwargs = dict(vocab_size=300, block_size=32, n_layer=2, n_head=2, n_embd=64, dropout=0.0, bias=False)
    kwargs.update(overrides)
    return GPTConfig(**kwargs)


def small_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(small_config(**overrides)).eval()


def reference_greedy(model: GPT, idx: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding written out naively: full forward on the last block_size tokens every step."""
    V, block = model.config.vocab_size, model.config.block_size
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(idx[:, -block:])
            tok = logits[:, -1, :V].argmax(-1)
            out.append(tok)
            idx = torch.cat([idx, tok[:, None]], dim=1)
    return torch.stack(out, dim=1)


def run(model: GPT, idx: torch.Tensor, n: int, **kwargs) -> torch.Tensor:
    """Collect generate()'s per-step tokens into (B, steps)."""
    return torch.stack(list(model.generate(idx, n, **kwargs)), dim=1)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("vocab_size", [1, 63, 64, 65, 300, 8192, 50257])
def test_padded_vocab_size(vocab_size: int) -> None:
    padded = GPTConfig(vocab_size=vocab_size).padded_vocab_size
    assert padded % 64 == 0
    assert vocab_size <= padded < vocab_size + 64


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(n_embd=250, n_head=4), "n_embd"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(block_size=-1), "block_size"),
        (dict(n_layer=0), "n_layer"),
        (dict(n_head=0), "n_head"),
        (dict(n_embd=-64), "n_embd"),
        (dict(n_layer=2.5), "n_layer"),
        (dict(dropout=1.0), "dropout"),
        (dict(dropout=-0.1), "dropout"),
        (dict(activation="relu"), "activation"),
    ],
)
def test_config_validation(overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        GPTConfig(**overrides)


def test_divisibility_message_names_both_numbers() -> None:
    with pytest.raises(ValueError, match=r"n_embd \(250\).*n_head \(4\)"):
        GPTConfig(n_embd=250, n_head=4)


# ----------------------------------------------------------------------------- forward / loss


def test_forward_shapes_and_initial_loss() -> None:
    model = small_model(vocab_size=512)
    idx = torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(2))
    logits, loss = model(idx, targets)
    assert logits.shape == (8, 32, 512)
    assert abs(loss.item() - math.log(512)) < 0.1
    _, no_loss = model(idx)
    assert no_loss is None


def test_logits_have_padded_width() -> None:
    model = small_model()
    logits, _ = model(torch.zeros(2, 5, dtype=torch.long))
    assert logits.shape == (2, 5, 320)


def test_loss_ignores_pad_targets() -> None:
    model = small_model()
    idx = torch.randint(0, 300, (2, 16))
    targets = torch.randint(0, 300, (2, 16))
    logits, _ = model(idx)
    masked = targets.clone()
    masked[:, 8:] = PAD_TARGET
    _, loss = model(idx, masked)
    expected = torch.nn.functional.cross_entropy(logits[:, :8].reshape(-1, 320), targets[:, :8].reshape(-1))
    torch.testing.assert_close(loss, expected)


def test_forward_too_long_raises() -> None:
    model = small_model()
    with pytest.raises(ValueError, match=r"33.*32"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_overfits_one_batch() -> None:
    torch.manual_seed(0)
    model = GPT(small_config())
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 300, (4, 33), generator=g)
    x, y = data[:, :-1], data[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    model.train()
    for _ in range(300):
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if loss.item() < 0.5:
            break
    assert loss.item() < 0.5


# ----------------------------------------------------------------------------- init / structure


def test_weights_are_tied() -> None:
    model = small_model()
    assert model.lm_head.weight is model.transformer.wte.weight
    names = dict(model.named_parameters())
    assert "lm_head.weight" not in names  # counted once, under transformer.wte.weight


def test_parameter_names_follow_gpt2() -> None:
    names = set(dict(small_model(bias=True).named_parameters()))
    for expected in [
        "transformer.wte.weight",
        "transformer.wpe.weight",
        "transformer.h.0.ln_1.weight",
        "transformer.h.0.ln_1.bias",
        "transformer.h.0.attn.c_attn.weight",
        "transformer.h.0.attn.c_attn.bias",
        "transformer.h.0.attn.c_proj.weight",
        "transformer.h.1.ln_2.weight",
        "transformer.h.1.mlp.c_fc.weight",
        "transformer.h.1.mlp.c_proj.weight",
        "transformer.ln_f.weight",
    ]:
        assert expected in names, expected
    assert "lm_head.weight" in small_model().state_dict()


def test_no_bias_parameters_when_bias_false() -> None:
    assert not any(n.endswith(".bias") for n, _ in small_model(bias=False).named_parameters())


def test_residual_projection_init_std() -> None:
    torch.manual_seed(0)
    model = GPT(small_config(n_layer=4, n_embd=128))
    resid = torch.cat([p.flatten() for n, p in model.named_parameters() if n.endswith("c_proj.weight")])
    other = torch.cat([p.flatten() for n, p in model.named_parameters() if n.endswith("c_fc.weight")])
    assert resid.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.05)
    assert other.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_param_counts_and_flops() -> None:
    cfg = small_config()
    model = GPT(cfg)
    total = sum(p.numel() for p in model.parameters())
    emb = cfg.padded_vocab_size * cfg.n_embd + cfg.block_size * cfg.n_embd
    assert model.num_params(non_embedding=False) == total
    assert model.num_params() == total - emb
    # per layer: qkv 3C^2, proj C^2, mlp 8C^2, two LayerNorm weights 2C; plus ln_f C
    C = cfg.n_embd
    assert model.num_params() == cfg.n_layer * (12 * C * C + 2 * C) + C
    assert isinstance(model.flops_per_token(), int)


@pytest.mark.parametrize("recipe", [{}, {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu",
                                         "tie_embeddings": False}])
def test_flops_per_token_match_torchs_flop_counter(recipe: dict) -> None:
    """flops_per_token against the matmuls torch counts in one forward + backward at full context."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    cfg = small_config(**recipe)
    model = GPT(cfg)
    batch, T = 2, cfg.block_size
    idx = torch.randint(0, cfg.vocab_size, (batch, T))
    counter = FlopCounterMode(display=False)
    # The math backend runs attention as bmm's the counter sees (the fused CPU kernel is not counted at all).
    with sdpa_kernel(SDPBackend.MATH), counter:
        _, loss = model(idx, idx)
        loss.backward()
    counted = counter.get_total_flops() / (batch * T)
    # flops_per_token also counts 6 FLOPs per norm gain (1-D parameters), which are no matmul.
    gains = sum(p.numel() for p in model.parameters() if p.dim() == 1)
    assert model.flops_per_token() == counted + 6 * gains


# ----------------------------------------------------------------------------- causality / cache


def test_model_is_causal() -> None:
    model = small_model()
    idx = torch.randint(0, 300, (2, 20))
    logits, _ = model(idx)
    for t in [0, 7, 18]:
        changed = idx.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 1) % 300
        logits2, _ = model(changed)
        torch.testing.assert_close(logits2[:, : t + 1], logits[:, : t + 1])
        assert not torch.allclose(logits2[:, t + 1], logits[:, t + 1])


def test_forward_cached_in_chunks_matches_full_forward() -> None:
    model = small_model()
    idx = torch.randint(0, 300, (3, 32))
    full, _ = model(idx)
    cache = model.new_cache(3)
    with torch.no_grad():
        parts = [model.forward_cached(idx[:, a:b], cache) for a, b in [(0, 10), (10, 15), (15, 16), (16, 32)]]
    assert cache.pos == 32
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="block_size"):
        model.forward_cached(idx[:, :1], cache)


def test_cached_and_uncached_greedy_match() -> None:
    model = small_model(block_size=128)
    prompt = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(3))
    cached = run(model, prompt, 64, temperature=0.0, use_cache=True)
    uncached = run(model, prompt, 64, temperature=0.0, use_cache=False)
    assert cached.shape == (2, 64)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, reference_greedy(model, prompt, 64))


def test_generation_past_block_size_slides() -> None:
    model = small_model(block_size=32)
    prompt = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(4))  # cropped to 32
    cached = run(model, prompt, 64, temperature=0.0, use_cache=True)
    uncached = run(model, prompt, 64, temperature=0.0, use_cache=False)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, reference_greedy(model, prompt, 64))

    short = prompt[:, :5]  # cache fills part-way through, then the fallback kicks in
    assert torch.equal(run(model, short, 64, temperature=0.0), reference_greedy(model, short, 64))


# ----------------------------------------------------------------------------- sampling


def test_sampling_is_reproducible_with_generator() -> None:
    model = small_model()
    prompt = torch.randint(0, 300, (2, 4))
    for kwargs in [dict(), dict(top_k=20), dict(top_p=0.9), dict(top_k=50, top_p=0.8, temperature=0.7)]:
        a = run(model, prompt, 20, generator=torch.Generator().manual_seed(7), **kwargs)
        b = run(model, prompt, 20, generator=torch.Generator().manual_seed(7), **kwargs)
        assert torch.equal(a, b), kwargs
    # a high temperature on a near-uniform model should not just repeat greedy
    greedy = run(model, prompt, 20, temperature=0.0)
    sampled = run(model, prompt, 20, temperature=2.0, generator=torch.Generator().manual_seed(7))
    assert not torch.equal(greedy, sampled)


def test_top_k_one_and_tiny_top_p_are_greedy() -> None:
    model = small_model()
    prompt = torch.randint(0, 300, (2, 4))
    greedy = run(model, prompt, 16, temperature=0.0)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(run(model, prompt, 16, top_k=1, generator=g), greedy)
    assert torch.equal(run(model, prompt, 16, top_p=1e-6, generator=g), greedy)


def test_top_k_restricts_support() -> None:
    model = small_model()
    logits = torch.randn(4, 320)
    g = torch.Generator().manual_seed(0)
    allowed = logits[:, :300].topk(5, dim=-1).indices
    for _ in range(50):
        tok = model._sample(logits, 1.0, 5, None, g)
        assert (allowed == tok[:, None]).any(dim=-1).all()


def test_top_p_keeps_smallest_nucleus() -> None:
    model = small_model(vocab_size=64)
    logits = torch.full((1, 64), -1e9)
    logits[0, :3] = torch.tensor([0.5, 0.3, 0.2]).log()  # probabilities 0.5, 0.3, 0.2
    g = torch.Generator().manual_seed(0)
    seen = {int(model._sample(logits, 1.0, None, 0.75, g)) for _ in range(200)}
    assert seen == {0, 1}  # 0.5 < 0.75 <= 0.5 + 0.3


def test_padded_ids_never_sampled() -> None:
    model = small_model(bias=True)  # vocab 300 padded to 320
    with torch.no_grad():
        # Make the final hidden state constant (ln_f weight 0, bias 1) and the padded rows of the tied
        # embedding huge, so the padded ids dominate the logits unless they are masked out.
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)
        model.transformer.wte.weight[300:] = 1.0
    prompt = torch.randint(0, 300, (4, 4))
    assert model(prompt)[0][0, -1].argmax() >= 300
    for kwargs in [dict(temperature=0.0), dict(), dict(top_k=400), dict(top_p=1.0), dict(temperature=5.0)]:
        toks = run(model, prompt, 10, generator=torch.Generator().manual_seed(0), **kwargs)
        assert (toks < 300).all(), kwargs


def test_stops_at_stop_token() -> None:
    model = small_model()
    prompt = torch.randint(0, 300, (1, 6))
    first = run(model, prompt, 1, temperature=0.0)[0, 0].item()
    out = list(model.generate(prompt, 10, temperature=0.0, stop_token=first))
    assert len(out) == 1 and out[0].item() == first


def test_finished_rows_keep_yielding_stop_token() -> None:
    model = small_model()
    g = torch.Generator().manual_seed(5)
    while True:  # find two prompts whose greedy first tokens differ
        prompt = torch.randint(0, 300, (2, 6), generator=g)
        first = run(model, prompt, 1, temperature=0.0)[:, 0]
        if first[0] != first[1]:
            break
    stop = first[0].item()
    out = run(model, prompt, 8, temperature=0.0, stop_token=stop)
    assert (out[0] == stop).all()
    assert out[1, 0].item() != stop


def test_generate_yields_batch_shaped_tokens_and_crops_prompt() -> None:
    model = small_model()
    steps = list(model.generate(torch.randint(0, 300, (3, 100)), 5, temperature=0.0))
    assert len(steps) == 5
    assert all(s.shape == (3,) and s.dtype == torch.long for s in steps)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(temperature=-0.5), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=0), "top_k"),
        (dict(max_new_tokens=0), "max_new_tokens"),
    ],
)
def test_generate_argument_validation(kwargs: dict, name: str) -> None:
    model = small_model()
    kwargs = dict(max_new_tokens=4) | kwargs
    with pytest.raises(ValueError, match=name):
        list(model.generate(torch.zeros(1, 3, dtype=torch.long), **kwargs))
