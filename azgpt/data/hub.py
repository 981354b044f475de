"""Hugging Face datasets as corpora: ``hf:NAME?config=C&split=S&text_field=F`` and named Azerbaijani corpora.

``NAME`` is a dataset on the Hub or a local folder laid out like one (a README.md with a ``configs:`` section
and data files); ``datasets`` (the optional extra ``azgpt[datasets]``) reads it, streamed, so the first
document flows before anything is downloaded whole. The older ``hf:NAME:SPLIT`` still works. A named corpus
(``fineweb2-az``, ...) stands for one such string plus what a model card needs: size, licence and source;
query keys after a name override its own (``fineweb2-az?split=test``).
"""

from __future__ import annotations

import importlib.util
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from azgpt.errors import AzGPTError

HF_PREFIX = "hf:"
QUERY_KEYS = ("config", "split", "text_field")
_HUB_CHECK_SECONDS = 5.0


@dataclass(frozen=True)
class HubSpec:
    """One split of one config of a dataset, and the field holding its text."""

    dataset: str
    config: str | None = None
    split: str = "train"
    text_field: str | None = None  # None: the corpus-wide --text_field

    def label(self) -> str:
        query = "&".join(f"{k}={v}" for k, v in (("config", self.config), ("split", self.split),
                                                  ("text_field", self.text_field)) if v is not None)
        return f"{HF_PREFIX}{self.dataset}?{query}"


@dataclass(frozen=True)
class NamedCorpus:
    """An Azerbaijani corpus azgpt knows by name."""

    name: str
    spec: HubSpec
    size: str
    licence: str
    url: str
    about: str
    hf_license: str | None = None  # the Hub's licence id for a model card; None where no one id is right


KNOWN_CORPORA: dict[str, NamedCorpus] = {c.name: c for c in (
    NamedCorpus("fineweb2-az", HubSpec("HuggingFaceFW/fineweb-2", "azj_Latn", "train", "text"),
                "7.3 M documents, 28.9 GB of text (published test split: 95 MB)", "ODC-By 1.0",
                "https://huggingface.co/datasets/HuggingFaceFW/fineweb-2", "web pages, deduplicated and filtered",
                "odc-by"),
    NamedCorpus("wikipedia-az", HubSpec("wikimedia/wikipedia", "20231101.az", "train", "text"),
                "196 K articles, 434 MB of text", "CC BY-SA 4.0 (and GFDL)",
                "https://huggingface.co/datasets/wikimedia/wikipedia", "Azerbaijani Wikipedia, 2023-11-01 dump",
                "cc-by-sa-4.0"),
    NamedCorpus("hplt2-az", HubSpec("HPLT/HPLT2.0_cleaned", "azj_Latn", "train", "text"),
                "several GB of text (see the source)", "CC0 1.0 (the packaging; the texts keep their own rights)",
                "https://huggingface.co/datasets/HPLT/HPLT2.0_cleaned", "web crawls (Internet Archive, Common Crawl), cleaned"),
)}


def named_corpus(source: str) -> NamedCorpus | None:
    """The known corpus ``source`` names (``fineweb2-az``, also with a ``?split=...`` query), else None."""
    return KNOWN_CORPORA.get(source.partition("?")[0])


def is_hub_corpus(source: object) -> bool:
    """Whether a corpus string names a dataset (``hf:...``) or a known corpus rather than a path."""
    if not isinstance(source, str):
        return False
    return source.startswith(HF_PREFIX) or _split_query(source)[0] in KNOWN_CORPORA


def parse_hub_corpus(source: str) -> tuple[HubSpec, NamedCorpus | None]:
    """The dataset a corpus string stands for, and the named corpus it came from (None for ``hf:``)."""
    base, query = _split_query(source)
    named = KNOWN_CORPORA.get(base)
    if named is not None:
        spec = named.spec
    else:
        if not base.startswith(HF_PREFIX):
            raise unknown_corpus_error(source)
        name = base[len(HF_PREFIX):]
        if not query and ":" in name and not Path(name).exists():
            name, _, split = name.rpartition(":")  # the older hf:NAME:SPLIT
            query = {"split": split}
        if not name:
            raise AzGPTError(f"corpus {source!r} names no dataset: write hf:NAME?config=C&split=S&text_field=F")
        if Path(name).is_file():
            raise AzGPTError(f"corpus {source!r}: {name} is a file, and hf: takes a dataset's name or a folder laid "
                             f"out like a Hub dataset: pass the file itself (--corpus {name})")
        spec = HubSpec(name)
    return replace(spec, **query), named


def unknown_corpus_error(source: str) -> AzGPTError:
    return AzGPTError(f"corpus {source!r} is neither a file or folder nor a known corpus name; known names: "
                      f"{', '.join(KNOWN_CORPORA)} (azgpt corpora lists them), or hf:NAME for any Hugging Face "
                      f"dataset")


def _split_query(source: str) -> tuple[str, dict[str, str]]:
    if "?" not in source:
        return source, {}
    base, _, query = source.partition("?")
    pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=False)
    unknown = [k for k, _ in pairs if k not in QUERY_KEYS]
    if unknown or not pairs:
        raise AzGPTError(f"corpus {source!r}: unknown query key {', '.join(unknown) or query!r}; the keys are "
                         f"{', '.join(QUERY_KEYS)} (e.g. hf:NAME?config=C&split=S&text_field=F)")
    repeated = sorted({k for k, _ in pairs if sum(key == k for key, _ in pairs) > 1})
    if repeated:
        values = ", ".join(v for k, v in pairs if k == repeated[0])
        raise AzGPTError(f"corpus {source!r}: {repeated[0]}= is given more than once ({values}): keep one")
    empty = [k for k, v in pairs if not v]
    if empty:
        raise AzGPTError(f"corpus {source!r}: {empty[0]}= has no value")
    return base, dict(pairs)


def provenance(source: str) -> dict[str, str]:
    """What meta.json and the model card record about a Hub corpus: dataset, config, split, licence, url."""
    spec, named = parse_hub_corpus(source)
    record = {"corpus": source, "dataset": spec.dataset, "split": spec.split}
    if spec.config:
        record["config"] = spec.config
    if named is not None:
        record.update(licence=named.licence, url=named.url)
    return record


def require_datasets() -> None:
    if importlib.util.find_spec("datasets") is None:
        raise AzGPTError("reading a Hugging Face dataset needs the optional 'datasets' package: "
                         "pip install 'azgpt[datasets]' (or pass a .txt, .txt.gz or .jsonl file instead)")


def iter_hub_texts(source: str, default_text_field: str) -> Iterator[str]:
    """Stream the text field of every record of a Hub corpus, checking config, split and field first."""
    require_datasets()
    spec, _ = parse_hub_corpus(source)
    field = spec.text_field or default_text_field
    dataset = open_stream(spec, source)
    columns = getattr(dataset, "column_names", None)
    if columns is not None and field not in columns:
        raise _missing_field_error(source, field, columns)
    for row in dataset:
        text = row.get(field)
        if not isinstance(text, str):
            if field not in row:
                raise _missing_field_error(source, field, list(row))
            if text is None:
                continue  # a null in a text column is an empty document
            raise AzGPTError(f"corpus {source}: field {field!r} holds {type(text).__name__}, not text: "
                             f"pick a text column with text_field=NAME")
        yield text


def _missing_field_error(source: str, field: str, columns: list[str]) -> AzGPTError:
    return AzGPTError(f"corpus {source}: a record has no {field!r} field; its fields are {', '.join(columns)}: "
                      f"add text_field=NAME to the corpus string (or pass --text_field)")


def open_stream(spec: HubSpec, source: str):
    """``datasets.load_dataset(..., streaming=True)`` with its errors turned into one line each."""
    import datasets

    local = Path(spec.dataset).is_dir()
    if not local:
        _check_hub_reachable(spec, source)
    try:
        configs = datasets.get_dataset_config_names(spec.dataset)
    except ConnectionError as exc:
        raise _offline_error(source, exc) from None
    except Exception as exc:  # FileNotFoundError, DatasetNotFoundError, ...: the user needs the reason
        raise AzGPTError(f"corpus {source}: cannot open dataset {spec.dataset!r} ({exc})") from None
    if spec.config is not None and spec.config not in configs:
        raise AzGPTError(f"corpus {source}: dataset {spec.dataset!r} has no config {spec.config!r}; its configs "
                         f"are {_listing(configs)}")
    if spec.config is None and len(configs) > 1:
        raise AzGPTError(f"corpus {source}: dataset {spec.dataset!r} has several configs; name one with "
                         f"config=NAME: {_listing(configs)}")
    try:
        splits = datasets.get_dataset_split_names(spec.dataset, spec.config)
    except ConnectionError as exc:
        raise _offline_error(source, exc) from None
    except Exception:
        splits = None  # not every builder can list its splits without reading; load_dataset will say
    if splits and spec.split not in splits:
        raise AzGPTError(f"corpus {source}: config {spec.config or configs[0]!r} of {spec.dataset!r} has no split "
                         f"{spec.split!r}; its splits are {_listing(splits)}")
    try:
        return datasets.load_dataset(spec.dataset, spec.config, split=spec.split, streaming=True)
    except ConnectionError as exc:
        raise _offline_error(source, exc) from None
    except Exception as exc:
        raise AzGPTError(f"corpus {source}: cannot open dataset {spec.dataset!r} ({exc})") from None


def _listing(names: list[str], shown: int = 20) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _check_hub_reachable(spec: HubSpec, source: str) -> None:
    """Fail in seconds, not after ``datasets``' minute of retries, when the Hub cannot be reached.

    Skipped in offline mode (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``), where ``datasets`` reads its cache.
    """
    if any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return
    endpoint = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=_HUB_CHECK_SECONDS).close()
    except OSError as exc:
        raise _offline_error(source, exc) from None


def _offline_error(source: str, exc: BaseException) -> AzGPTError:
    return AzGPTError(f"corpus {source}: cannot reach the Hugging Face Hub ({exc}); with no network, prepare a local "
                      f"corpus (azgpt prepare --corpus my_texts/) or train on the sample with --config quickstart.yaml")


def corpora_command() -> int:
    """``azgpt corpora``: the Azerbaijani corpora azgpt knows by name, with size, licence and source."""
    for corpus in KNOWN_CORPORA.values():
        print(f"{corpus.name}: {corpus.about}")
        print(f"    {corpus.spec.label()}")
        print(f"    size: {corpus.size}")
        print(f"    licence: {corpus.licence}")
        print(f"    source: {corpus.url}")
    print("Use a name wherever a corpus goes (azgpt prepare --corpus fineweb2-az --max_bytes 1GB, "
          "data.corpus: [wikipedia-az]); query keys override its own (fineweb2-az?split=test).")
    return 0
