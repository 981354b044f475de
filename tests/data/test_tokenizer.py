"""The byte-level BPE tokenizer: special token, lossless decoding, normalisation, cutting long texts."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from azgpt.data.corpus import iter_documents
from azgpt.errors import AzGPTError
from azgpt.data.tokenizer import (
    EOT,
    MIN_VOCAB_SIZE,
    check_vocab_size,
    fertility_report,
    load_tokenizer,
    other_tokenizer,
    split_at_line_breaks,
    splits_like_azgpt,
    token_byte_lengths,
    tokenizer_from_json,
    tokenizer_sha256,
    train_tokenizer,
)

AZ = ["Azərbaycan dili türk dilləri ailəsinə aiddir.", "Ağ göyərçin ılıq İyul günündə uçdu.",
      "Şəki, Gəncə, Quba və Lənkəran şəhərləri.", "Çörək, üzüm, ördək, ilıq su.", "İ i I ı — böyük və kiçik."]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return train_tokenizer(list(iter_documents(None)), vocab_size=600)


def test_end_of_text_is_a_special_token_with_id_0(tokenizer: Tokenizer) -> None:
    assert tokenizer.token_to_id(EOT) == 0
    added = tokenizer.get_added_tokens_decoder()
    assert added[0].content == EOT and added[0].special
    assert tokenizer.encode(f"salam{EOT}dünya").ids.count(0) == 1
    assert tokenizer.decode(tokenizer.encode(f"a{EOT}b").ids, skip_special_tokens=False) == f"a{EOT}b"


def test_vocab_is_the_requested_size_and_includes_all_bytes(tokenizer: Tokenizer) -> None:
    assert tokenizer.get_vocab_size() == 600
    lengths = token_byte_lengths(tokenizer)
    assert lengths[0] == 0 and sum(1 for n in lengths if n == 1) == 256


@pytest.mark.parametrize("text", AZ + ["emoji 🙂 ✓, 中文, tab\tand\nnewline", "  spaces  ", "\u00a0nbsp", "x" * 1000])
def test_byte_level_decoding_is_lossless(tokenizer: Tokenizer, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text).ids) == text


def test_unseen_characters_still_round_trip(tokenizer: Tokenizer) -> None:
    text = "ꙮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ٱلْعَرَبِيَّة"
    ids = tokenizer.encode(text).ids
    assert tokenizer.decode(ids) == text
    assert tokenizer.token_to_id("[UNK]") is None


def test_normaliser_folds_schwa_and_composes_but_keeps_case(tokenizer: Tokenizer) -> None:
    assert tokenizer.decode(tokenizer.encode("\u04d9l\u04d9 \u04d8li").ids) == "\u0259l\u0259 \u018fli"
    assert tokenizer.decode(tokenizer.encode("gu\u0308l").ids) == "gül"
    assert tokenizer.decode(tokenizer.encode("İI ıi").ids) == "İI ıi"


def test_azerbaijani_letters_become_few_tokens(tokenizer: Tokenizer) -> None:
    # Trained on Azerbaijani, frequent words with ə ğ ı ş ç should not fall apart into single bytes.
    text = "Azərbaycan və şəhər"
    assert len(tokenizer.encode(text).ids) < len(text.encode("utf-8")) / 2


def test_training_is_deterministic_and_file_round_trips(tokenizer: Tokenizer, tmp_path: Path) -> None:
    again = train_tokenizer(list(iter_documents(None)), vocab_size=600)
    assert tokenizer_sha256(again) == tokenizer_sha256(tokenizer)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    assert tokenizer_sha256(loaded) == tokenizer_sha256(tokenizer)
    assert tokenizer_sha256(tokenizer_from_json(tokenizer.to_str())) == tokenizer_sha256(tokenizer)


def test_a_recorded_fingerprint_is_compared_with_the_tokenizer_in_one_place(tokenizer: Tokenizer) -> None:
    sha = tokenizer_sha256(tokenizer)
    assert other_tokenizer(sha, tokenizer) is None
    assert other_tokenizer("0" * 64, tokenizer) == f"sha256 000000000000..., this one {sha[:12]}..."
    assert other_tokenizer(None, tokenizer) == f"sha256 None..., this one {sha[:12]}..."


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(AzGPTError, match=r"tokenizer file .*missing\.json does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(AzGPTError, match=r"bad\.json is not a Hugging Face tokenizer"):
        load_tokenizer(tmp_path / "bad.json")
    plain = train_tokenizer(["salam"], 300)
    content = json.loads(plain.to_str())
    content["added_tokens"] = []
    content["model"]["vocab"].pop(EOT)
    (tmp_path / "noeot.json").write_text(json.dumps(content), encoding="utf-8")
    with pytest.raises(AzGPTError, match=r"noeot\.json has no <\|endoftext\|>"):
        load_tokenizer(tmp_path / "noeot.json")


@pytest.mark.parametrize("bad", [0, 257, MIN_VOCAB_SIZE - 1, "8192", 8192.0, True, None])
def test_vocab_size_must_be_an_integer_of_at_least_258(bad: object) -> None:
    with pytest.raises(AzGPTError, match=r"--vocab_size must be an integer of at least 258"):
        check_vocab_size(bad)


def test_smallest_vocab_trains() -> None:
    assert check_vocab_size(MIN_VOCAB_SIZE) == 258
    assert train_tokenizer(["ab ab ab ab"], MIN_VOCAB_SIZE).get_vocab_size() == 258


def test_fertility_report_is_one_line() -> None:
    line = fertility_report(words=1000, characters=6000, tokens=1500)
    assert "\n" not in line
    assert "1.50 tokens per word" in line and "4.00 characters per token" in line


def test_cutting_at_line_breaks_keeps_ids_exact(tokenizer: Tokenizer) -> None:
    assert splits_like_azgpt(tokenizer)
    docs = list(iter_documents(None))
    tricky = "a\n  b\n\nc \nd\n\t\ne.\nİ\n\u0307x\n" * 40  # whitespace around newlines must not be cut
    tricky += "a  b 's\t c , 12 ab\u0307 x . y" * 40  # nor around spaces
    for document in docs + [tricky, "\n".join(docs)]:
        for max_chars in (8, 60, 500):
            pieces = split_at_line_breaks(document, max_chars)
            assert "".join(pieces) == document
            cut_ids = list(itertools.chain.from_iterable(e.ids for e in tokenizer.encode_batch(pieces)))
            assert cut_ids == tokenizer.encode(document).ids


def test_cuts_after_a_newline_else_before_a_space_else_at_the_limit() -> None:
    text = "alpha\nbeta gamma\n delta\nepsilon"
    pieces = split_at_line_breaks(text, 8)
    assert pieces == ["alpha\n", "beta", " gamma\n delta\n", "epsilon"]
    assert split_at_line_breaks("no newline " * 3, 12) == ["no newline", " no newline", " no newline "]
    assert split_at_line_breaks("x" * 70, 8) == ["x" * 32, "x" * 32, "x" * 6]  # no whitespace: cut at 4 x 8
    assert split_at_line_breaks("short", 8) == ["short"]


def test_foreign_pipeline_is_not_cut(tokenizer: Tokenizer) -> None:
    from tokenizers import pre_tokenizers

    other = Tokenizer.from_str(tokenizer.to_str())
    other.pre_tokenizer = pre_tokenizers.Whitespace()
    assert not splits_like_azgpt(other)


def test_training_on_normalised_documents_can_skip_the_normaliser() -> None:
    normalised = list(iter_documents(None))[:40]
    plain = train_tokenizer(normalised + ["M\u04d9kt\u04d9b gu\u0308l"], 400)
    skipped = train_tokenizer(normalised + ["Məktəb gül"], 400, normalized=True)
    assert tokenizer_sha256(plain) == tokenizer_sha256(skipped)
    assert skipped.normalizer is not None  # the saved tokenizer still normalises prompts
