"""Hugging Face corpora: a local folder laid out like a Hub dataset repo, read by ``datasets`` itself, and
the named Azerbaijani corpora (resolution only: no network in tests)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from azgpt.data import hub
from azgpt.data.corpus import iter_documents, normalize_text
from azgpt.data.hub import HubSpec, parse_hub_corpus, provenance
from azgpt.errors import AzGPTError
from tests.data.test_prepare import decoded_documents, run_prepare

pytest.importorskip("datasets")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

WORDS = ("Azərbaycan", "Bakı", "şəhəri", "dağların", "başı", "qarla", "örtüldü", "İlqar", "çörək", "ılıq",
         "M\u04d9kt\u04d9b", "uşaqlar", "\u04d8lifba", "dəniz", "küçə", "gözəl", "tarix", "Gəncə")
README = """---
configs:
- config_name: azj_Latn
  data_files:
  - split: train
    path: data/azj_Latn/train/*.parquet
  - split: test
    path: data/azj_Latn/test/*.parquet
- config_name: tur_Latn
  data_files:
  - split: train
    path: data/tur_Latn/train/*.parquet
---
# A dataset laid out like FineWeb-2
"""


def record_text(i: int) -> str:
    """A varied Azerbaijani-looking record: Cyrillic schwa and a control character that normalisation fixes."""
    words = [WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(5 + i % 11)]
    text = " ".join(words) + f" {i}."
    if i % 4 == 0:
        text += "\nİkinci sətir\x07 burada."
    return text


def write_shard(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": texts, "id": [f"doc-{i}" for i in range(len(texts))]}), path)


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """README.md with a configs: section, parquet shards per config and split."""
    root = tmp_path_factory.mktemp("hub") / "fineweb-like"
    texts = [record_text(i) for i in range(700)]
    write_shard(root / "data/azj_Latn/train/000_00000.parquet", texts[:400])
    write_shard(root / "data/azj_Latn/train/000_00001.parquet", texts[400:])
    write_shard(root / "data/azj_Latn/test/000_00000.parquet", [record_text(i) for i in range(1000, 1080)])
    write_shard(root / "data/tur_Latn/train/000_00000.parquet", ["Türkçe bir metin."] * 10)
    (root / "README.md").write_text(README, encoding="utf-8")
    return root


def prepare_args(corpus: str, out: Path, *extra: str) -> list[str]:
    return ["--corpus", corpus, "--out", str(out), "--vocab_size", "300", "--block_size", "8", *extra]


def test_prepare_reads_a_hub_layout_folder_and_decodes_back_to_its_records(hub_dir: Path, tmp_path: Path,
                                                                            capsys) -> None:
    out = tmp_path / "out"
    code, _, err = run_prepare(capsys, *prepare_args(f"hf:{hub_dir}?config=azj_Latn&split=train", out,
                                                     "--max_docs", "500", "--val_fraction", "0.1"))
    assert code == 0, err
    docs = decoded_documents(out)
    expected = [normalize_text(record_text(i)).strip() for i in range(500)]
    assert sorted(docs["train"] + docs["val"]) == sorted(expected)
    assert docs["train"] == [d for d in expected if d in set(docs["train"])]  # stream order kept
    assert all("\u04d9" not in d and "\x07" not in d for d in docs["train"])
    meta = json.loads((out / "meta.json").read_text())
    assert meta["corpora"] == [{"corpus": f"hf:{hub_dir}?config=azj_Latn&split=train", "dataset": str(hub_dir),
                                "split": "train", "config": "azj_Latn"}]
    assert meta["slice"] == {"max_docs": 500, "max_bytes": None}


def test_validation_from_the_published_split(hub_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    code, _, err = run_prepare(capsys, *prepare_args(f"hf:{hub_dir}?config=azj_Latn", out, "--max_bytes", "20KB",
                                                     "--val_corpus", f"hf:{hub_dir}?config=azj_Latn&split=test"))
    assert code == 0, err
    docs = decoded_documents(out)
    assert docs["val"] == [normalize_text(record_text(i)).strip() for i in range(1000, 1080)]
    assert sum(len(d.encode()) for d in docs["train"]) <= 20_000
    assert docs["train"] == [normalize_text(record_text(i)).strip() for i in range(len(docs["train"]))]
    assert json.loads((out / "meta.json").read_text())["val_fraction"] is None


@pytest.mark.parametrize("query, named", [
    ("config=nope&split=train", ["'nope'", "azj_Latn, tur_Latn"]),
    ("config=tur_Latn&split=test", ["no split 'test'", "its splits are train"]),
    ("split=train", ["several configs", "azj_Latn, tur_Latn"]),
    ("config=azj_Latn&text_field=body", ["no 'body' field", "text, id"]),
    ("config=azj_Latn&colour=red", ["unknown query key 'colour'", "config, split, text_field"]),
])
def test_bad_config_split_or_field_is_one_line_naming_what_exists(hub_dir: Path, tmp_path: Path, capsys,
                                                                  query: str, named: list[str]) -> None:
    out = tmp_path / "out"
    code, _, err = run_prepare(capsys, *prepare_args(f"hf:{hub_dir}?{query}", out))
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("azgpt: error: ")
    for part in named:
        assert part in err
    assert not out.exists()


def test_the_older_name_colon_split_form_still_works(tmp_path: Path) -> None:
    root = tmp_path / "single"
    write_shard(root / "data/train-00000.parquet", ["bir", "iki"])
    write_shard(root / "data/test-00000.parquet", ["üç"])
    assert list(iter_documents(f"hf:{root}:test")) == ["üç"]
    assert list(iter_documents(f"hf:{root}")) == ["bir", "iki"]


def test_named_corpora_resolve_to_their_dataset_config_and_split() -> None:
    assert parse_hub_corpus("fineweb2-az")[0] == HubSpec("HuggingFaceFW/fineweb-2", "azj_Latn", "train", "text")
    assert parse_hub_corpus("wikipedia-az")[0] == HubSpec("wikimedia/wikipedia", "20231101.az", "train", "text")
    assert parse_hub_corpus("hplt2-az")[0] == HubSpec("HPLT/HPLT2.0_cleaned", "azj_Latn", "train", "text")
    assert parse_hub_corpus("fineweb2-az?split=test")[0].split == "test"
    assert parse_hub_corpus("hf:user/set:validation")[0] == HubSpec("user/set", None, "validation", None)
    record = provenance("fineweb2-az")
    assert record["licence"].startswith("ODC-By") and record["url"].endswith("HuggingFaceFW/fineweb-2")
    assert record["dataset"] == "HuggingFaceFW/fineweb-2" and record["config"] == "azj_Latn"


def test_unknown_corpus_name_lists_the_known_ones(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    code, _, err = run_prepare(capsys, "--corpus", "fineweb-az", "--out", out)
    assert code == 2 and "'fineweb-az'" in err and "fineweb2-az, wikipedia-az, hplt2-az" in err
    assert not out.exists()


def test_no_network_is_one_line_at_once(tmp_path: Path, capsys, monkeypatch) -> None:
    def unreachable(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(hub.socket, "create_connection", unreachable)
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "out"
    code, _, err = run_prepare(capsys, "--corpus", "fineweb2-az", "--out", out)
    assert code == 2 and "cannot reach the Hugging Face Hub" in err and "quickstart.yaml" in err
    assert not out.exists()


def test_without_datasets_the_error_names_the_pip_command(without_datasets: None) -> None:
    with pytest.raises(AzGPTError, match=r"pip install 'azgpt\[datasets\]'"):
        list(iter_documents("wikipedia-az"))


@pytest.mark.parametrize("size", ["2XB", "-1GB", "lots", "0"])
def test_bad_max_bytes_is_refused(tmp_path: Path, capsys, size: str) -> None:
    out = tmp_path / "out"
    code, _, err = run_prepare(capsys, f"--max_bytes={size}", "--out", out)
    assert code == 2 and "--max_bytes" in err and "2GB" in err
    assert not out.exists()


def test_corpora_verb_lists_size_licence_and_source(capsys) -> None:
    from azgpt.cli import main

    assert main(["corpora"]) == 0
    out = capsys.readouterr().out
    # Written down from the datasets' own cards (and README's "Named corpora"), not from KNOWN_CORPORA.
    published = {
        "fineweb2-az": ("28.9 GB", "ODC-By 1.0", "https://huggingface.co/datasets/HuggingFaceFW/fineweb-2"),
        "wikipedia-az": ("434 MB", "CC BY-SA 4.0", "https://huggingface.co/datasets/wikimedia/wikipedia"),
        "hplt2-az": ("GB", "CC0 1.0", "https://huggingface.co/datasets/HPLT/HPLT2.0_cleaned"),
    }
    assert sorted(hub.KNOWN_CORPORA) == sorted(published)
    entries = {block.split(":", 1)[0]: block for block in re.split(r"\n(?=\S)", out)}  # a name, its indented lines
    for name, (size, licence, url) in published.items():
        entry = entries[name]
        assert "size: " in entry and size in entry and f"licence: {licence}" in entry and f"source: {url}" in entry


def test_base_config_without_network_stops_at_once_and_never_trains_on_the_sample(tmp_path: Path, capsys,
                                                                                   monkeypatch) -> None:
    from azgpt.cli import main

    def unreachable(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(hub.socket, "create_connection", unreachable)
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    code = main(["fit", "--config", "base.yaml", "--trainer.accelerator", "cpu", "--trainer.logger", "false",
                 "--trainer.enable_progress_bar", "false"])
    err = capsys.readouterr().err
    assert code == 2
    assert "azgpt: error: corpus fineweb2-az: cannot reach the Hugging Face Hub" in err
    assert "quickstart.yaml" in err and "prepare a local corpus" in err
    assert not (tmp_path / "data").exists()


def test_tokenizer_trains_on_a_capped_sample_and_the_dataset_is_read_once(hub_dir: Path, tmp_path: Path, capsys,
                                                                          monkeypatch) -> None:
    opened = []
    real_open = hub.open_stream
    monkeypatch.setattr(hub, "open_stream", lambda spec, source: opened.append(source) or real_open(spec, source))
    out = tmp_path / "out"
    code, stdout, err = run_prepare(capsys, *prepare_args(f"hf:{hub_dir}?config=azj_Latn", out,
                                                          "--tokenizer_sample", "2KB"))
    assert code == 0, err
    assert opened == [f"hf:{hub_dir}?config=azj_Latn"]
    meta = json.loads((out / "meta.json").read_text())
    assert 2_000 <= meta["tokenizer_sample_bytes"] < 2_000 + 200  # whole documents up to the size
    assert sum(meta["splits"][s]["documents"] for s in ("train", "val")) == 700  # yet every record is encoded
    assert f"tokenizer trained on the first {meta['tokenizer_sample_bytes']:,} bytes" in stdout


def test_the_first_document_flows_before_the_dataset_is_read_whole(hub_dir: Path, tmp_path: Path) -> None:
    """README: datasets are streamed. The second train shard here is garbage: a reader that loads (or
    downloads) the split whole fails before its first document; a stream yields the first shard's 400 first."""
    import itertools
    import shutil

    broken = tmp_path / "fineweb-like"
    shutil.copytree(hub_dir, broken)
    (broken / "data/azj_Latn/train/000_00001.parquet").write_bytes(b"not a parquet file" * 100)
    documents = iter_documents(f"hf:{broken}?config=azj_Latn&split=train")
    first = list(itertools.islice(documents, 400))
    assert first == [normalize_text(record_text(i)).strip() for i in range(400)]
    with pytest.raises(pa.ArrowInvalid, match="Parquet magic bytes not found"):
        next(documents)  # the broken shard is reached only now
