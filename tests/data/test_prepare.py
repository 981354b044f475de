"""``azgpt prepare``: token files that decode back to the corpus, and every bad input refused cleanly."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from azgpt.data import prepare as prepare_module
from azgpt.cli import main
from azgpt.data.corpus import iter_documents
from azgpt.data.prepare import PrepareConfig, prepare
from azgpt.data.tokenizer import EOT, load_tokenizer, tokenizer_sha256, train_tokenizer

SHARED_WEB = Path(__file__).resolve().parents[3] / "shared" / "corpus" / "web.txt.gz"
OUTPUT_FILES = {"train.npy", "val.npy", "tokenizer.json", "meta.json"}

# Azerbaijani letters ə ğ ı İ ö ü ş ç, and a Cyrillic ә (U+04D9) / Ә (U+04D8) that must come back as Latin.
AZ_DOCS = [
    "Əli ilə Gülşən çayxanada oturub söhbət edirdilər.",
    "Ağacın budağında iki sığırçın ötürdü; İlqar onları şəklə çəkdi.",
    "Bu il qış tez gəldi: dağların başı ağappaq qarla örtüldü.",
    "M\u04d9kt\u04d9bd\u04d9 uşaqlar \u04d8lifbanı öyrənirlər.\nMüəllim hər hərfi lövhəyə yazır.",
    "İçərişəhərin dar küçələrində gəzmək xoşdur. Qız qalası uzaqdan görünür.",
    "Çörəkçi səhər tezdən təndiri qızdırır, isti çörəyin ətri küçəyə yayılır.",
    "Işıqlar söndü, şəhər yuxuya getdi. Yalnız dəniz ləpələri səs salırdı.",
    "Üzüm bağında işləyən kəndlilər günortaya qədər çalışdılar.",
]


def corpus(tmp_path: Path, docs: list[str], name: str = "corpus.txt", repeat: int = 6) -> Path:
    """A text file of ``docs`` repeated with small variations, blank lines between documents."""
    path = tmp_path / name
    blocks = [f"{doc} ({i})" for i in range(repeat) for doc in docs]
    path.write_text("\n\n".join(blocks) + "\n", encoding="utf-8")
    return path


def run_prepare(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    code = main(["prepare", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def decoded_documents(out: Path) -> dict[str, list[str]]:
    """Decode each split of a prepared folder back into documents (split on the end-of-text id)."""
    tokenizer = load_tokenizer(out / "tokenizer.json")
    eot = tokenizer.token_to_id(EOT)
    docs: dict[str, list[str]] = {}
    for split in ("train", "val"):
        ids = np.load(out / f"{split}.npy", mmap_mode="r")
        assert ids[-1] == eot
        ends = np.flatnonzero(ids == eot)
        starts = np.concatenate([[0], ends[:-1] + 1])
        docs[split] = [tokenizer.decode(ids[s:e].tolist()) for s, e in zip(starts, ends)]
    return docs


def assert_no_output(out: Path) -> None:
    """Nothing that a failed run wrote: the folder is absent or holds no token files, not even partial ones."""
    if out.exists():
        assert sorted(p.name for p in out.iterdir()) == []


def tiny_args(path: Path, out: Path, *extra: str) -> list[str | Path]:
    return ["--corpus", path, "--out", out, "--vocab_size", "300", "--block_size", "8", "--val_fraction", "0.25",
            *extra]


# --- round trips --------------------------------------------------------------------------------------


def test_azerbaijani_round_trip_with_cyrillic_schwa_folded(tmp_path: Path, capsys) -> None:
    path = corpus(tmp_path, AZ_DOCS)
    out = tmp_path / "out"
    code, stdout, err = run_prepare(capsys, *tiny_args(path, out))
    assert code == 0, err
    assert {p.name for p in out.iterdir()} == OUTPUT_FILES

    expected = list(iter_documents(path))
    assert any("Məktəbdə" in d and "Əlifbanı" in d for d in expected)
    assert not any("\u04d9" in d or "\u04d8" in d for d in expected)
    docs = decoded_documents(out)
    assert Counter(docs["train"] + docs["val"]) == Counter(expected)
    assert docs["train"] and docs["val"]
    for letter in "əğıİöüşçƏ":
        assert any(letter in d for d in docs["train"] + docs["val"])

    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    tokenizer = load_tokenizer(out / "tokenizer.json")
    assert meta["vocab_size"] == tokenizer.get_vocab_size() == 300
    assert meta["dtype"] == "uint16" and np.load(out / "train.npy").dtype == np.uint16
    assert meta["tokenizer_sha256"] == tokenizer_sha256(tokenizer)
    assert meta["eot_id"] == tokenizer.token_to_id(EOT)
    for split in ("train", "val"):
        assert meta["splits"][split]["tokens"] == len(np.load(out / f"{split}.npy", mmap_mode="r"))
        assert meta["splits"][split]["documents"] == len(docs[split])

    # The closing summary: documents, characters, tokens, chars/token, time, MB/s, and the fertility line.
    assert "documents" in stdout and "chars/token" in stdout and "MB/s" in stdout
    assert "tokens per word" in stdout and "characters per token" in stdout


def test_split_is_deterministic_for_a_seed(tmp_path: Path, capsys, monkeypatch) -> None:
    path = corpus(tmp_path, AZ_DOCS)
    assert run_prepare(capsys, *tiny_args(path, tmp_path / "a", "--seed", "7"))[0] == 0
    # Batch boundaries must not move documents between splits.
    monkeypatch.setattr(prepare_module, "_ENCODE_BATCH_CHARS", 50)
    assert run_prepare(capsys, *tiny_args(path, tmp_path / "b", "--seed", "7"))[0] == 0
    assert run_prepare(capsys, *tiny_args(path, tmp_path / "c", "--seed", "8"))[0] == 0
    for split in ("train.npy", "val.npy"):
        assert (tmp_path / "a" / split).read_bytes() == (tmp_path / "b" / split).read_bytes()
    assert decoded_documents(tmp_path / "a")["val"] != decoded_documents(tmp_path / "c")["val"]


def test_text_that_spells_the_end_of_text_token_stays_text(tmp_path: Path, capsys) -> None:
    path = corpus(tmp_path, AZ_DOCS + [f"Bu sənəddə {EOT} yazısı var."])
    out = tmp_path / "out"
    assert run_prepare(capsys, *tiny_args(path, out))[0] == 0
    docs = decoded_documents(out)
    assert Counter(docs["train"] + docs["val"]) == Counter(iter_documents(path))


def test_jsonl_folder_and_reused_tokenizer(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    records = [{"body": f"{doc} #{i}"} for i in range(4) for doc in AZ_DOCS]
    (folder / "sub" / "a.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records),
                                            encoding="utf-8")
    corpus(folder, AZ_DOCS, name="b.txt")
    first, second = tmp_path / "first", tmp_path / "second"
    assert run_prepare(capsys, *tiny_args(folder, first, "--text_field", "body"))[0] == 0
    code, stdout, err = run_prepare(capsys, *tiny_args(folder, second, "--text_field", "body", "--tokenizer",
                                                       first / "tokenizer.json"))
    assert code == 0, err
    assert "tokenizer reused" in stdout
    for name in ("train.npy", "val.npy", "tokenizer.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    docs = decoded_documents(second)
    assert Counter(docs["train"] + docs["val"]) == Counter(iter_documents(folder, text_field="body"))


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_WEB.is_file(), reason=f"shared corpus {SHARED_WEB} is absent (only CI and dev machines have it)")
def test_shared_web_corpus_round_trip(tmp_path: Path, capsys) -> None:
    out = tmp_path / "web"
    code, _, err = run_prepare(capsys, "--corpus", SHARED_WEB, "--out", out, "--vocab_size", "2048")
    assert code == 0, err
    docs = decoded_documents(out)
    expected = list(iter_documents(SHARED_WEB))
    assert len(expected) > 700
    assert Counter(docs["train"] + docs["val"]) == Counter(expected)
    # Documents stay in corpus order within each split, and the split depends on the seed only.
    train_set = set(docs["train"])
    assert docs["train"] == [d for d in expected if d in train_set]
    again = tmp_path / "again"
    assert run_prepare(capsys, "--corpus", SHARED_WEB, "--out", again, "--tokenizer", out / "tokenizer.json")[0] == 0
    for name in ("train.npy", "val.npy"):
        assert (out / name).read_bytes() == (again / name).read_bytes()


# --- token ids over 65,535 ----------------------------------------------------------------------------


def test_ids_over_65535_switch_files_to_uint32(tmp_path: Path, capsys) -> None:
    tokenizer = train_tokenizer(AZ_DOCS, 300)
    tokenizer.add_tokens([f"<w{i}>" for i in range(66_000)])
    assert tokenizer.get_vocab_size() > 2**16
    tokenizer.save(str(tmp_path / "big.json"))
    docs = [f"{doc} <w65535> <w65999>, <w{i}>." for i, doc in enumerate(AZ_DOCS)]
    path = corpus(tmp_path, docs)
    out = tmp_path / "out"
    code, _, err = run_prepare(capsys, *tiny_args(path, out, "--tokenizer", tmp_path / "big.json"))
    assert code == 0, err
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == tokenizer.get_vocab_size()
    train = np.load(out / "train.npy", mmap_mode="r")
    val = np.load(out / "val.npy", mmap_mode="r")
    assert train.dtype == val.dtype == np.uint32
    high = tokenizer.token_to_id("<w65999>")
    assert high > 65_535 and high in train and high in val  # never wrapped to high - 65,536
    decoded = decoded_documents(out)
    assert Counter(decoded["train"] + decoded["val"]) == Counter(iter_documents(path))


# --- bad input: exit 2, one clear message, nothing left behind -----------------------------------------


def assert_refused(capsys, args: list, *message_parts: str) -> str:
    code, _, err = run_prepare(capsys, *args)
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("azgpt: error: ")]
    assert len(lines) == 1, err
    for part in message_parts:
        assert part in lines[0], lines[0]
    return lines[0]


def test_missing_corpus_path(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert_refused(capsys, ["--corpus", tmp_path / "missing.txt.gz", "--out", out], "missing.txt.gz", "does not exist")
    assert not out.exists()


@pytest.mark.parametrize("content", ["", "\n\n  \n\t\n", "\ufeff\x00\x01\n\n"])
def test_empty_or_whitespace_corpus(tmp_path: Path, capsys, content: str) -> None:
    path = tmp_path / "empty.txt"
    path.write_text(content, encoding="utf-8")
    out = tmp_path / "out"
    assert_refused(capsys, tiny_args(path, out), "empty.txt", "has no text")
    assert not out.exists()


def test_empty_corpus_with_a_reused_tokenizer(tmp_path: Path, capsys) -> None:
    train_tokenizer(AZ_DOCS, 300).save(str(tmp_path / "tok.json"))
    path = tmp_path / "empty.txt.gz"
    with gzip.open(path, "wt") as handle:
        handle.write("   \n\n")
    out = tmp_path / "out"
    assert_refused(capsys, tiny_args(path, out, "--tokenizer", tmp_path / "tok.json"), "empty.txt.gz", "has no text")
    assert_no_output(out)
    assert not out.exists()


def test_invalid_utf8_names_file_and_line(tmp_path: Path, capsys) -> None:
    path = corpus(tmp_path, AZ_DOCS)
    with open(path, "ab") as handle:
        handle.write(b"\nSon s\xe6n\xe6d\n")
    line = len(path.read_bytes().splitlines())
    out = tmp_path / "out"
    assert_refused(capsys, tiny_args(path, out), f"corpus.txt:{line}:", "invalid UTF-8", "--errors replace")
    assert not out.exists()


def test_invalid_utf8_replaced_on_request_and_counted(tmp_path: Path, capsys) -> None:
    path = corpus(tmp_path, AZ_DOCS)
    with open(path, "ab") as handle:
        handle.write(b"\nSon s\xe6n\xe6d\n")
    out = tmp_path / "out"
    code, stdout, err = run_prepare(capsys, *tiny_args(path, out, "--errors", "replace"))
    assert code == 0, err
    assert "replaced 2 invalid UTF-8" in stdout
    docs = decoded_documents(out)
    assert "Son s\ufffdn\ufffdd" in docs["train"] + docs["val"]


def test_corpus_too_small_for_both_splits_says_how_many_tokens(tmp_path: Path, capsys) -> None:
    path = corpus(tmp_path, AZ_DOCS[:2], repeat=2)
    out = tmp_path / "out"
    line = assert_refused(capsys, ["--corpus", path, "--out", out, "--vocab_size", "300", "--val_fraction", "0.5"],
                          "corpus too small", "needs at least 257", "--block_size")
    assert " tokens " in line
    assert not out.exists()


def test_vocab_size_below_258_is_refused(tmp_path: Path, capsys) -> None:
    path = corpus(tmp_path, AZ_DOCS)
    out = tmp_path / "out"
    assert_refused(capsys, ["--corpus", path, "--out", out, "--vocab_size", "257"], "--vocab_size", "at least 258")
    assert not out.exists()


@pytest.mark.parametrize("value", ["abc", "300.5", ""])
def test_vocab_size_not_an_integer_is_refused_by_argparse(tmp_path: Path, capsys, value: str) -> None:
    out = tmp_path / "out"
    assert main(["prepare", "--corpus", str(tmp_path), "--out", str(out), "--vocab_size", value]) == 2
    assert 'Parser key "vocab_size"' in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("value", ["0", "1", "1.5", "-0.1"])
def test_val_fraction_out_of_range_is_refused(tmp_path: Path, capsys, value: str) -> None:
    path = corpus(tmp_path, AZ_DOCS)
    assert_refused(capsys, ["--corpus", path, "--out", tmp_path / "out", "--val_fraction", value], "--val_fraction")
    assert not (tmp_path / "out").exists()


def test_out_that_is_a_file_is_refused(tmp_path: Path, capsys) -> None:
    path = corpus(tmp_path, AZ_DOCS)
    (tmp_path / "out").write_text("x")
    assert_refused(capsys, tiny_args(path, tmp_path / "out"), "--out", "not a folder")


def test_hf_corpus_without_datasets(tmp_path: Path, capsys, without_datasets: None) -> None:
    out = tmp_path / "out"
    assert_refused(capsys, ["--corpus", "hf:user/az-corpus", "--out", out], "datasets", "pip install")
    assert not out.exists()


def test_out_from_a_different_tokenizer_needs_overwrite(tmp_path: Path, capsys) -> None:
    path = corpus(tmp_path, AZ_DOCS)
    out = tmp_path / "out"
    assert run_prepare(capsys, *tiny_args(path, out))[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    # The same tokenizer again is fine; a different one is refused and touches nothing.
    assert run_prepare(capsys, *tiny_args(path, out))[0] == 0
    bigger = ["--corpus", path, "--out", out, "--vocab_size", "320", "--block_size", "8", "--val_fraction", "0.25"]
    assert_refused(capsys, bigger, f"--out {out}", "different tokenizer", "--overwrite")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    code, _, err = run_prepare(capsys, *bigger, "--overwrite")
    assert code == 0, err
    assert json.loads((out / "meta.json").read_text())["vocab_size"] == 320
    assert {p.name for p in out.iterdir()} == OUTPUT_FILES


def test_out_with_token_files_but_no_meta_needs_overwrite(tmp_path: Path, capsys) -> None:
    path = corpus(tmp_path, AZ_DOCS)
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.npy").write_bytes(b"old")
    assert_refused(capsys, tiny_args(path, out), "train.npy", "--overwrite")
    assert (out / "train.npy").read_bytes() == b"old"
    assert run_prepare(capsys, *tiny_args(path, out, "--overwrite"))[0] == 0


# --- interruption ---------------------------------------------------------------------------------------


def interrupt_second_batch(monkeypatch) -> None:
    """Make the encoder die midway, after some ids have already been written."""
    monkeypatch.setattr(prepare_module, "_ENCODE_BATCH_CHARS", 100)
    original = prepare_module._BatchEncoder.write
    calls = {"n": 0}

    def write(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(prepare_module._BatchEncoder, "write", write)


def test_interrupted_run_leaves_nothing_that_looks_finished(tmp_path: Path, monkeypatch) -> None:
    path = corpus(tmp_path, AZ_DOCS)
    out = tmp_path / "deep" / "out"
    interrupt_second_batch(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        prepare(PrepareConfig(out=out, corpus=[str(path)], vocab_size=300, block_size=8, val_fraction=0.25))
    assert not (tmp_path / "deep").exists()


def test_interrupted_overwrite_keeps_the_previous_complete_files(tmp_path: Path, monkeypatch) -> None:
    path = corpus(tmp_path, AZ_DOCS)
    out = tmp_path / "out"
    config = PrepareConfig(out=out, corpus=[str(path)], vocab_size=300, block_size=8, val_fraction=0.25)
    prepare(config)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    interrupt_second_batch(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        prepare(PrepareConfig(out=out, corpus=[str(path)], vocab_size=320, block_size=8, val_fraction=0.25,
                              overwrite=True))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_encoder_restores_the_tokenizer_it_borrows(tmp_path: Path) -> None:
    path = corpus(tmp_path, AZ_DOCS)
    summary = prepare(PrepareConfig(out=tmp_path / "out", corpus=[str(path)], vocab_size=300, block_size=8,
                                    val_fraction=0.25))
    assert summary.dtype == "uint16"
    saved = load_tokenizer(tmp_path / "out" / "tokenizer.json")
    assert saved.encode(f"a{EOT}b").ids.count(saved.token_to_id(EOT)) == 1  # saved file treats EOT as special

