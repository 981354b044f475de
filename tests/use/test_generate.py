"""Generation from a checkpoint: safe loading, the command line, streaming, and samples in TensorBoard."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tokenizers.pre_tokenizers import ByteLevel

from azgpt.train.callbacks import TextSamples
from azgpt.checkpoint import load_checkpoint
from azgpt.cli import main
from azgpt.errors import AzGPTError
from azgpt.use.generate import Generator, generate_text
from azgpt.data.tokenizer import EOT

PROMPT = "Azərbaycan"


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def generate_cli(capsys: pytest.CaptureFixture, ckpt: Path, *extra: str) -> tuple[int, str, str]:
    return run_cli(capsys, "generate", "--ckpt", str(ckpt), "--prompt", PROMPT, *extra)


@pytest.fixture(scope="module")
def generator(tiny_run) -> Generator:
    return Generator.from_checkpoint(tiny_run.ckpt, device="cpu")


# ----------------------------------------------------------------------------- decoding


def test_cached_and_uncached_greedy_identical_for_64_tokens(tiny_run, generator: Generator, capsys) -> None:
    ids, dropped = generator.encode_prompt(PROMPT)
    assert dropped == 0 and len(ids) + 64 <= generator.model.config.block_size  # the cache is used throughout
    idx = torch.tensor([ids])
    cached = torch.cat(list(generator.model.generate(idx, 64, temperature=0.0, use_cache=True)))
    uncached = torch.cat(list(generator.model.generate(idx, 64, temperature=0.0, use_cache=False)))
    assert cached.shape == (64,)
    assert torch.equal(cached, uncached)

    code, with_cache, _ = generate_cli(capsys, tiny_run.ckpt, "--temperature", "0", "--max-new-tokens", "64")
    assert code == 0
    code, without_cache, _ = generate_cli(capsys, tiny_run.ckpt, "--temperature", "0", "--max-new-tokens", "64",
                                          "--no-cache")
    assert code == 0
    assert with_cache == without_cache
    assert with_cache.startswith(PROMPT)


def test_sampling_with_a_seed_is_reproducible(tiny_run, generator: Generator, capsys) -> None:
    kwargs = dict(max_new_tokens=20, temperature=1.0, top_k=100, top_p=0.95)
    first = generator.generate(PROMPT, seed=7, **kwargs)
    assert first == generator.generate(PROMPT, seed=7, **kwargs)
    assert first != generator.generate(PROMPT, seed=8, **kwargs)

    runs = [generate_cli(capsys, tiny_run.ckpt, "--seed", "7", "--max-new-tokens", "20", "--num-samples", "2")
            for _ in range(2)]
    assert runs[0] == runs[1]
    code, out, _ = runs[0]
    assert code == 0
    assert "--- sample 1 of 2 (seed 7) ---" in out and "--- sample 2 of 2 (seed 8) ---" in out


def test_python_api_matches_the_command_line(tiny_run, capsys) -> None:
    text = generate_text(tiny_run.ckpt, PROMPT, device="cpu", max_new_tokens=12, temperature=0.0)
    code, out, _ = generate_cli(capsys, tiny_run.ckpt, "--temperature", "0", "--max-new-tokens", "12")
    assert code == 0
    assert out == PROMPT + text + "\n"


def test_generation_stops_at_end_of_text(tiny_run, tmp_path: Path, capsys) -> None:
    # A model whose final LayerNorm outputs zeros gives every token the same logit; argmax takes the first id,
    # which is <|endoftext|>, so the greedy continuation must end at once.
    checkpoint = torch.load(tiny_run.ckpt, map_location="cpu", weights_only=True)
    assert load_checkpoint(tiny_run.ckpt).tokenizer.token_to_id(EOT) == 0
    checkpoint["state_dict"]["model.transformer.ln_f.weight"].zero_()
    silent = tmp_path / "silent.ckpt"
    torch.save(checkpoint, silent)
    code, out, _ = run_cli(capsys, "generate", "--ckpt", str(silent), "--prompt", PROMPT, "--temperature", "0",
                           "--max-new-tokens", "50")
    assert code == 0
    assert out == PROMPT + "\n"


def scripted(generator: Generator, token_ids: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the model 'generate' exactly these tokens."""
    monkeypatch.setattr(generator.model, "generate",
                        lambda *args, **kwargs: iter(torch.tensor([i]) for i in token_ids))


def test_stream_ends_at_end_of_text_token(generator: Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    tok = generator.tokenizer
    scripted(generator, tok.encode(" salam").ids + [tok.token_to_id(EOT)] + tok.encode(" sonra").ids, monkeypatch)
    assert generator.generate(PROMPT, max_new_tokens=50) == " salam"


def test_multibyte_characters_split_across_tokens_stream_whole(generator: Generator,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    tok = generator.tokenizer
    # "ə" and "ş" are two UTF-8 bytes each: feed them one byte-token at a time.
    byte_chars = "".join(piece for piece, _ in ByteLevel(add_prefix_space=False).pre_tokenize_str("əş"))
    ids = [tok.token_to_id(c) for c in byte_chars]
    assert len(ids) == 4 and None not in ids
    scripted(generator, ids, monkeypatch)
    pieces = list(generator.stream(PROMPT, max_new_tokens=10))
    assert "".join(pieces) == "əş"
    assert all("\ufffd" not in piece for piece in pieces)


def test_an_unfinished_character_at_the_end_is_still_written(generator: Generator,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    tok = generator.tokenizer
    first_byte_of_schwa = ByteLevel(add_prefix_space=False).pre_tokenize_str("ə")[0][0][0]
    scripted(generator, tok.encode("a").ids + [tok.token_to_id(first_byte_of_schwa)], monkeypatch)
    assert generator.generate(PROMPT, max_new_tokens=10) == "a\ufffd"


def test_long_prompt_is_cropped_from_the_left_with_a_note(tiny_run, generator: Generator, capsys) -> None:
    long_prompt = "Bakı Azərbaycanın paytaxtıdır. " * 30
    ids, dropped = generator.encode_prompt(long_prompt)
    assert dropped > 0 and len(ids) == generator.model.config.block_size
    with pytest.warns(UserWarning, match="block size"):
        generator.generate(long_prompt, max_new_tokens=3, temperature=0.0)
    code, out, err = run_cli(capsys, "generate", "--ckpt", str(tiny_run.ckpt), "--prompt", long_prompt,
                             "--max-new-tokens", "3", "--seed", "1")
    assert code == 0
    assert "note:" in err and f"kept the last {len(ids)}" in err
    assert out.startswith(generator.tokenizer.decode(ids))


# ----------------------------------------------------------------------------- bad input


def write_foreign(path: Path) -> None:
    torch.save({"state_dict": {"weight": torch.zeros(2, 2)}, "epoch": 3}, path)


def write_without_tokenizer(path: Path, source: Path) -> None:
    checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    checkpoint["azgpt"]["tokenizer"] = None
    torch.save(checkpoint, path)


@pytest.mark.parametrize(
    "make, pattern",
    [
        (None, r"does not exist"),
        (lambda p, src: p.write_bytes(b"\x80\x02not a checkpoint at all" * 10), r"not a readable checkpoint"),
        (lambda p, src: p.write_bytes(src.read_bytes()[:5000]), r"not a readable checkpoint"),
        (lambda p, src: p.write_bytes(b""), r"not a readable checkpoint"),
        (lambda p, src: write_foreign(p), r"not an azgpt checkpoint"),
        (lambda p, src: torch.save([1, 2, 3], p), r"not an azgpt checkpoint"),
        (write_without_tokenizer, r"holds no tokenizer"),
    ],
    ids=["missing", "corrupt", "truncated", "empty", "foreign", "not-a-dict", "no-tokenizer"],
)
def test_bad_checkpoints_exit_2_naming_the_file(make, pattern: str, tiny_run, tmp_path: Path, capsys) -> None:
    path = tmp_path / "bad.ckpt"
    if make is not None:
        make(path, tiny_run.ckpt)
    code, out, err = run_cli(capsys, "generate", "--ckpt", str(path), "--prompt", PROMPT)
    assert code == 2
    assert err.startswith("azgpt: error: ") and str(path) in err
    assert re.search(pattern, err)
    assert "Traceback" not in err and out == ""


@pytest.mark.parametrize(
    "extra, pattern",
    [
        (["--prompt", ""], r"prompt is empty"),
        (["--prompt", PROMPT, "--top-p", "0"], r"top_p must be in \(0, 1\], got 0.0"),
        (["--prompt", PROMPT, "--top-p", "1.5"], r"top_p must be in \(0, 1\], got 1.5"),
        (["--prompt", PROMPT, "--top-p", "-0.2"], r"top_p must be in \(0, 1\]"),
        (["--prompt", PROMPT, "--temperature", "-0.5"], r"temperature must be .*>= 0"),
        (["--prompt", PROMPT, "--temperature", "nan"], r"Parser key \"temperature\""),
        (["--prompt", PROMPT, "--max-new-tokens", "0"], r"max_new_tokens must be an integer >= 1, got 0"),
        (["--prompt", PROMPT, "--max-new-tokens", "-3"], r"max_new_tokens must be an integer >= 1"),
        (["--prompt", PROMPT, "--top-k", "0"], r"top_k must be an integer >= 1"),
        (["--prompt", PROMPT, "--num-samples", "0"], r"--num_samples must be >= 1"),
    ],
)
def test_bad_options_exit_2_with_a_clear_message(extra: list[str], pattern: str, tiny_run, capsys) -> None:
    code, out, err = run_cli(capsys, "generate", "--ckpt", str(tiny_run.ckpt), *extra)
    assert code == 2
    assert re.search(pattern, err), err
    assert out == ""


def test_python_api_rejects_bad_options(generator: Generator) -> None:
    with pytest.raises(AzGPTError, match="top_p"):
        generator.stream(PROMPT, top_p=2.0)  # raised at the call, not at the first next()
    with pytest.raises(AzGPTError, match="prompt is empty"):
        generator.generate("")
    with pytest.raises(AzGPTError, match="prompt is empty"):
        generator.generate([])


class Payload:
    """Unpickling this calls open(path, "w"), which creates the file: a stand-in for arbitrary code."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("container", ["torch-zip", "raw-pickle"])
def test_a_checkpoint_with_a_pickled_payload_is_refused_not_run(container: str, tmp_path: Path, capsys) -> None:
    def craft(path: Path, sentinel: Path) -> None:
        content = {"state_dict": {}, "hyper_parameters": Payload(sentinel), "azgpt": {"tokenizer": "{}"}}
        if container == "torch-zip":
            torch.save(content, path)
        else:
            path.write_bytes(pickle.dumps(content, protocol=2))

    # The crafted file really is dangerous: an unsafe load creates its sentinel.
    proof, proof_sentinel = tmp_path / "proof.ckpt", tmp_path / "proof-sentinel"
    craft(proof, proof_sentinel)
    if container == "torch-zip":
        torch.load(proof, weights_only=False)
    else:
        pickle.loads(proof.read_bytes())
    assert proof_sentinel.exists()

    evil, sentinel = tmp_path / "evil.ckpt", tmp_path / "sentinel"
    craft(evil, sentinel)
    for command in (["generate", "--ckpt", str(evil), "--prompt", PROMPT],
                    ["export", "--ckpt", str(evil), "--out", str(tmp_path / "hf")]):
        code, _, err = run_cli(capsys, *command)
        assert code == 2
        assert "refusing to load" in err and str(evil) in err
    assert not sentinel.exists()


# ----------------------------------------------------------------------------- samples in TensorBoard


def test_fit_writes_text_samples_to_tensorboard(tiny_run) -> None:
    events = EventAccumulator(str(tiny_run.log_dir), size_guidance={"tensors": 0})
    events.Reload()
    tags = events.Tags()["tensors"]
    for i, prompt in enumerate(["Azərbaycan", "Bakı şəhəri", "Bir gün"]):
        tag = f"samples/{i}/text_summary"
        assert tag in tags
        entries = events.Tensors(tag)
        assert [e.step for e in entries] == [2, 4]  # one per validation
        text = entries[-1].tensor_proto.string_val[0].decode("utf-8")
        assert text.startswith(f"**{prompt}**") and len(text) > len(prompt) + 4


def test_text_samples_checks_its_prompts() -> None:
    with pytest.raises(AzGPTError, match="prompts"):
        TextSamples(prompts=[])
    with pytest.raises(AzGPTError, match="prompts"):
        TextSamples(prompts=["ok", ""])
    with pytest.raises(AzGPTError, match="temperature"):
        TextSamples(temperature=-1)
