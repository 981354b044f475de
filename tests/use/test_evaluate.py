"""azgpt evaluate: the scores against a hand computation, the windows, the command line and its errors."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from azgpt.checkpoint import load_checkpoint
from azgpt.cli import main
from azgpt.data.corpus import iter_documents, sample_corpus_path
from azgpt.targets import PAD_TARGET
from azgpt.data.tokenizer import EOT, train_tokenizer
from azgpt.model import GPT, GPTConfig
from azgpt.use.evaluate import Score, Scorer, evaluate, iter_windows


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def news(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """Four news documents of the sample corpus in a file of their own, and the documents as read."""
    documents = list(itertools.islice(iter_documents(sample_corpus_path() / "xeberler.txt"), 4))
    path = tmp_path_factory.mktemp("evaluate") / "news.txt"
    path.write_text("\n\n".join(documents) + "\n", encoding="utf-8")
    return path, documents


def hand_scored(ckpt: Path, documents: list[str]) -> tuple[float, int, int]:
    """Total NLL, scored tokens and bytes, computed the plain way: one block at a time, end-of-text left out."""
    loaded = load_checkpoint(ckpt)
    model, tokenizer = loaded.build_model("cpu"), loaded.tokenizer
    eot = tokenizer.token_to_id(EOT)
    stream = [token for doc in documents for token in [eot, *tokenizer.encode(doc, add_special_tokens=False).ids]]
    block = model.config.block_size
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(stream) - 1, block):
            inputs = torch.tensor([stream[start : start + block]])
            targets = torch.tensor(stream[start + 1 : start + block + 1])
            logits, _ = model(inputs)
            per_token = F.cross_entropy(logits[0, : len(targets)], targets, reduction="none")
            text = targets != eot
            nll += per_token[text].double().sum().item()
            tokens += int(text.sum())
    return nll, tokens, sum(len(doc.encode("utf-8")) for doc in documents)


def test_loss_and_bits_per_byte_equal_a_hand_computation(tiny_run, news) -> None:
    path, documents = news
    nll, tokens, n_bytes = hand_scored(tiny_run.ckpt, documents)
    assert tokens > 3 * 96  # several blocks, the last one short
    result = evaluate(tiny_run.ckpt, str(path), batch_size=3, device="cpu")
    score = result.files[0]
    assert (score.documents, score.tokens, score.bytes) == (4, tokens, n_bytes)
    assert score.loss == pytest.approx(nll / tokens, rel=1e-5)
    assert score.bits_per_byte == pytest.approx(nll / (math.log(2) * n_bytes), rel=1e-5)
    assert score.perplexity == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    # The batch size changes how windows are grouped, never the result.
    assert evaluate(tiny_run.ckpt, str(path), batch_size=1, device="cpu").files[0].nll == pytest.approx(score.nll)


def test_text_is_normalised_like_training_text(tiny_run, tmp_path: Path) -> None:
    latin, cyrillic = tmp_path / "latin.txt", tmp_path / "cyrillic.txt"
    latin.write_text("Azərbaycan Respublikası Cənubi Qafqazda yerləşir.\n", encoding="utf-8")
    cyrillic.write_text("Azәrbaycan Respublikası Cәnubi Qafqazda yerlәşir.\n", encoding="utf-8")  # Cyrillic ә
    scores = evaluate(tiny_run.ckpt, [str(latin), str(cyrillic)], device="cpu").files
    assert scores[0].nll == pytest.approx(scores[1].nll) and scores[0].tokens == scores[1].tokens
    assert scores[0].bytes == scores[1].bytes == len("Azərbaycan Respublikası Cənubi Qafqazda yerləşir.".encode())


@pytest.mark.parametrize("block, stride, length", [(8, 8, 50), (8, 3, 50), (8, 1, 20), (8, 5, 6), (4, 4, 5)])
def test_windows_score_every_token_once(block: int, stride: int, length: int) -> None:
    stream = np.arange(length, dtype=np.int64)  # token id == position in the stream
    chunks = np.array_split(stream, 4)  # arriving in pieces changes nothing
    scored: list[int] = []
    for inputs, targets in iter_windows(chunks, block, stride):
        assert 1 <= len(inputs) <= block and np.array_equal(targets[targets != PAD_TARGET] - 1,
                                                             inputs[targets != PAD_TARGET])
        for position, target in enumerate(targets):
            if target != PAD_TARGET:
                scored.append(int(target))
                # context: everything before it in the window; at least block - stride unless near the start
                assert position + 1 >= min(int(target), block - stride + 1)
    assert scored == list(range(1, length))


def test_stride_gives_a_lower_or_equal_loss() -> None:
    """A model that needs its context scores better when each token sees more of it.

    The text: runs of 64 tokens, each drawn from its own 4 of 16 ids. The last token alone does not say which
    4; the tokens before it do, so a token at the start of a block (no context) costs more than one with context.
    """
    rng = np.random.default_rng(0)
    torch.manual_seed(0)

    def runs(count: int) -> np.ndarray:
        return np.concatenate([rng.choice(rng.choice(np.arange(20, 36), 4, replace=False), 64) for _ in range(count)])

    tokenizer = train_tokenizer(iter_documents(sample_corpus_path()), vocab_size=300)  # only its end-of-text counts here
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train = torch.from_numpy(runs(100))
    for _ in range(150):
        starts = torch.randint(0, len(train) - 17, (32,)).tolist()
        window = torch.stack([train[s : s + 17] for s in starts])
        _, loss = model(window[:, :-1], window[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    text = runs(20)
    scores = {}
    for stride in (16, 4):
        scores[stride] = Score("runs")
        Scorer(model, tokenizer, stride=stride, batch_size=16).score_tokens([text], scores[stride])
    assert {score.tokens for score in scores.values()} == {len(text) - 1}
    assert scores[16].loss > scores[4].loss + 0.01
    assert scores[4].loss < math.log(16) - 0.2  # it did learn to use the context


def test_command_prints_a_table_and_json(tiny_run, news, capsys) -> None:
    path, _ = news
    wiki_like = path.parent / "one.txt"
    wiki_like.write_text("Bakı Azərbaycanın paytaxtıdır.\n", encoding="utf-8")
    code, out, err = run_cli(capsys, "evaluate", "--ckpt", str(tiny_run.ckpt), "--corpus", str(path),
                             str(wiki_like), "--json", "--device", "cpu")
    assert code == 0, err
    report = json.loads(out)
    files, overall = report["files"], report["overall"]
    assert [f["name"] for f in files] == [str(path), str(wiki_like)]
    for key in ("documents", "tokens", "bytes"):
        assert overall[key] == sum(f[key] for f in files)
    assert overall["loss"] == pytest.approx(sum(f["nll"] for f in files) / overall["tokens"])
    assert report["stride"] == report["block_size"] == 96

    code, out, _ = run_cli(capsys, "evaluate", "--ckpt", str(tiny_run.ckpt), "--corpus", str(path),
                           str(wiki_like), "--stride", "32", "--device", "cpu")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["file", "documents", "tokens", "bytes", "loss", "perplexity", "bits/byte"]
    assert lines[2].startswith(str(path)) and lines[3].startswith(str(wiki_like)) and lines[5].startswith("all")
    assert "stride 32" in out and "different tokenizers" in out

    code, out, _ = run_cli(capsys, "evaluate", "--help")
    assert code == 0 and "bits per byte" in out.lower() and "different tokenizers" in " ".join(out.split())


def test_max_docs_scores_the_first_documents_of_each_file(tiny_run, news) -> None:
    path, documents = news
    score = evaluate(tiny_run.ckpt, str(path), max_docs=2, device="cpu").files[0]
    assert score.documents == 2 and score.bytes == sum(len(d.encode()) for d in documents[:2])


@pytest.mark.parametrize("content, argv, message", [
    (None, [], "does not exist"),
    ("", [], "has no text"),
    ("  \n\n\t\n", [], "has no text"),
    ("Salam.\n", ["--stride", "0"], "--stride must be"),
    ("Salam.\n", ["--stride", "97"], "--stride must be"),
    ("Salam.\n", ["--batch_size", "0"], "--batch_size must be"),
    ("Salam.\n", ["--max_docs", "0"], "--max_docs must be"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_run, tmp_path: Path, capsys, content, argv, message) -> None:
    path = tmp_path / "text.txt"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    code, out, err = run_cli(capsys, "evaluate", "--ckpt", str(tiny_run.ckpt), "--corpus", str(path), *argv,
                             "--device", "cpu")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("azgpt: error:") and message in err
    if content is not None and message == "has no text":
        assert str(path) in err


def test_missing_checkpoint_is_an_error(tmp_path: Path, capsys) -> None:
    text = tmp_path / "text.txt"
    text.write_text("Salam.\n", encoding="utf-8")
    code, out, err = run_cli(capsys, "evaluate", "--ckpt", str(tmp_path / "none.ckpt"), "--corpus", str(text))
    assert code == 2 and out == "" and "does not exist" in err
