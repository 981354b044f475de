"""The azgpt command surface: every verb listed, one flag style, --config and --print_config everywhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

import azgpt
from azgpt.argv import list_flags
from azgpt.cli import LIGHTNING, VERBS, main, snake_case_flags
from tests.conftest import TINY_BLOCK


def test_help_lists_every_verb(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name, verb in VERBS.items():
        assert f"  {name}" in out and verb.summary in out
    assert "predict" not in out


def test_no_verb_prints_the_usage_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "verbs:" in capsys.readouterr().out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"azgpt {azgpt.__version__}"


@pytest.mark.parametrize("verb", ["predict", "train", "--frobnicate"])
def test_unknown_verbs_are_refused_naming_the_real_ones(verb: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([verb]) == 2
    err = capsys.readouterr().err
    assert f"unknown verb {verb!r}" in err and "prepare" in err and "fit" in err


@pytest.mark.parametrize("verb", [name for name, verb in VERBS.items()
                                  if verb.target != LIGHTNING and not verb.raw_argv])
def test_every_function_verb_has_help_config_and_print_config(verb: str, capsys) -> None:
    assert main([verb, "--help"]) == 0
    out = capsys.readouterr().out
    assert f"azgpt {verb}" in out and "--config" in out and "--print_config" in out
    flags = set(re.findall(r"--[A-Za-z][\w.-]*", out))
    kebab = {flag for flag in flags if "-" in flag[2:]}
    assert not kebab, f"kebab-case flags in azgpt {verb} --help: {sorted(kebab)}"
    assert {"--config", "--print_config"} <= flags


@pytest.mark.parametrize("verb", [name for name, verb in VERBS.items() if verb.target == LIGHTNING or verb.raw_argv])
def test_lightning_verbs_take_the_same_config_flags(verb: str, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        main([verb, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "--config" in out and "--print_config" in out


def test_prepare_reads_its_options_from_a_config_file(tmp_path: Path, capsys) -> None:
    out = tmp_path / "tokens"
    config = tmp_path / "prepare.yaml"
    config.write_text(yaml.safe_dump({"out": str(out), "vocab_size": 300, "block_size": TINY_BLOCK}))
    assert main(["prepare", "--config", str(config), "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["vocab_size"] == 300 and printed["out"] == str(out) and not out.exists()
    assert main(["prepare", "--config", str(config), "--val_fraction", "0.1"]) == 0
    assert (out / "meta.json").is_file() and (out / "train.npy").is_file()


def test_old_kebab_spellings_still_work_with_a_note(capsys: pytest.CaptureFixture[str]) -> None:
    assert snake_case_flags(["--max-new-tokens", "5", "--top-k=3", "--prompt", "a-b"], "generate") == [
        "--max_new_tokens", "5", "--top_k=3", "--prompt", "a-b"]
    err = capsys.readouterr().err
    assert "--max-new-tokens is now spelled --max_new_tokens" in err and "--top_k" in err


def test_list_options_take_every_value_up_to_the_next_flag() -> None:
    assert list_flags(["--corpus", "a.txt", "b dir/", "--out", "x"], {"corpus"}) == [
        "--corpus", '["a.txt", "b dir/"]', "--out", "x"]
    assert list_flags(["--corpus", "[a.txt, b.txt]"], {"corpus"}) == ["--corpus", "[a.txt, b.txt]"]


def test_bad_values_exit_2_naming_the_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "--ckpt", str(tmp_path / "x.ckpt")]) == 2  # --out missing
    assert "the following arguments are required: out" in capsys.readouterr().err


@pytest.mark.parametrize("verb", [["fit", "--config", "quickstart.yaml"],
                                  ["finetune", "--config", "finetune.yaml", "--model.init_from", "base.ckpt"]])
def test_list_options_take_one_spelling_in_lightning_verbs_too(capsys, verb) -> None:
    """``--data.files a.jsonl b.jsonl`` (the README's spelling) parses under fit and finetune as under prepare."""
    import yaml

    option = "--data.corpus" if verb[0] == "fit" else "--data.files"
    with pytest.raises(SystemExit) as printed_and_left:  # LightningCLI's --print_config exits 0
        main([*verb, option, "a.txt", "b dir/", "--data.val_corpus" if verb[0] == "fit" else "--data.batch_size",
              "null" if verb[0] == "fit" else "4", "--print_config"])
    assert printed_and_left.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"][option.removeprefix("--data.")] == ["a.txt", "b dir/"]
    if verb[0] == "fit":
        assert printed["data"]["val_corpus"] is None
