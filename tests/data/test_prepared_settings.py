"""fit refuses a prepared folder made from other data than its config names (corpus, val_corpus, slice), in one
line naming both, instead of training or validating on the old files."""

from __future__ import annotations

import json
import shutil

import pytest

from azgpt.cli import main
from conftest import tiny_fit_args


@pytest.fixture
def other_text(tmp_path):
    from azgpt.data.corpus import sample_corpus_path

    path = tmp_path / "other.txt"
    path.write_text((sample_corpus_path() / "xeberler.txt").read_text(encoding="utf-8")[:4000], encoding="utf-8")
    return path


@pytest.mark.parametrize("option, value, message", [
    ("--data.corpus", "[{other}]", "data.corpus is {other} but {data} was prepared from the sample corpus"),
    ("--data.val_corpus", "[{other}]",
     "data.val_corpus is {other} but {data} took its validation text from val_fraction 0.1 of the corpus"),
    ("--data.max_bytes", "10KB", "data.max_bytes is 10,000 bytes but {data} was prepared from a slice of null"),
])
def test_fit_refuses_a_folder_prepared_from_other_data(prepared_dir, other_text, tmp_path, monkeypatch, capsys,
                                                       option, value, message) -> None:
    monkeypatch.chdir(tmp_path)
    args = tiny_fit_args(prepared_dir, max_steps=1) + [option, value.format(other=other_text)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message.format(other=other_text, data=prepared_dir) in err
    errors = [line for line in err.splitlines() if line.startswith("azgpt: error:")]
    assert len(errors) == 1 and message.format(other=other_text, data=prepared_dir) in errors[0]
    assert not (tmp_path / "lightning_logs").exists() or not list(tmp_path.glob("lightning_logs/*/checkpoints/*"))


def test_a_null_setting_accepts_the_folder_as_prepared(prepared_dir, tmp_path, monkeypatch, capsys) -> None:
    """prepare --corpus mine/ then fit --config quickstart.yaml (corpus: null) --data.data_dir: the folder decides."""
    monkeypatch.chdir(tmp_path)
    meta = json.loads((prepared_dir / "meta.json").read_text())
    moved = tmp_path / "data"
    shutil.copytree(prepared_dir, moved)
    (moved / "meta.json").write_text(json.dumps({**meta, "source": ["/elsewhere/mine.txt"]}))
    assert main(tiny_fit_args(moved, max_steps=1) + ["--trainer.logger", "false"]) == 0, capsys.readouterr().err


def test_a_moved_sample_corpus_is_still_the_sample(prepared_dir) -> None:
    """The sample corpus lives inside the installed package, which a reinstall moves: its file names identify it."""
    from azgpt.data.prepare import prepared_from_other_data

    meta = json.loads((prepared_dir / "meta.json").read_text())
    moved = {**meta, "source": [f"/old/venv/site-packages/azgpt/sample_corpus/{name.rsplit('/', 1)[-1]}"
                                for name in meta["source"]]}
    assert prepared_from_other_data(prepared_dir, moved, None, None, None, null_accepts_any=False) is None
    renamed = {**meta, "source": [name.replace(".txt", "-x.txt") for name in meta["source"]]}
    assert "was prepared from" in prepared_from_other_data(prepared_dir, renamed, None, None, None,
                                                           null_accepts_any=False)
