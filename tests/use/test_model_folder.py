"""The model folder (azgpt/artifact.py): fit writes it, and every use verb gives the same output from it as from
the run's last.ckpt."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from azgpt.artifact import FILES
from azgpt.cli import main


def run_verb(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_fit_writes_the_model_folder(tiny_run) -> None:
    folder = tiny_run.log_dir / "model"
    assert sorted(p.name for p in folder.iterdir()) == sorted(FILES)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["global_step"] == 4 and meta["format_version"] == 1
    assert Path(meta["source_checkpoint"]).name == "last.ckpt"
    assert set(meta["metrics"]) == {"val_loss", "val_ppl", "val_bpb"}
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"]["n_embd"] == 32 and config["architecture"]["vocab_size"] == 300
    # GPT-2's tied embedding and head: stored once, restored as one tensor.
    assert config["shared_weights"] == {"lm_head.weight": "transformer.wte.weight"}


@pytest.mark.parametrize("verb", [
    ("generate", "--prompt", "Bakı şəhəri", "--max_new_tokens", "12", "--temperature", "0"),
    ("generate", "--prompt", "Azərbaycan", "--max_new_tokens", "12", "--seed", "7"),
    ("evaluate", "--corpus", "[azgpt/sample_corpus/xeberler.txt]", "--json", "true"),
])
def test_use_verbs_give_the_same_output_from_folder_and_checkpoint(tiny_run, capsys, verb) -> None:
    repo = Path(__file__).resolve().parents[2]
    verb = tuple(str(repo / a[1:-1]).join("[]") if a.startswith("[azgpt") else a for a in verb)
    outputs = []
    for source in (tiny_run.log_dir / "model", tiny_run.ckpt, tiny_run.log_dir):
        code, out, err = run_verb(capsys, verb[0], "--ckpt", str(source), *verb[1:], "--device", "cpu")
        assert code == 0, err
        if verb[0] == "evaluate":
            result = json.loads(out)
            result.pop("checkpoint")
            out = json.dumps(result)
        outputs.append(out)
    assert outputs[0] == outputs[1] == outputs[2] and outputs[0].strip()


def test_exports_are_identical_from_folder_and_checkpoint(tiny_run, tmp_path, capsys) -> None:
    for name, source in (("a", tiny_run.log_dir / "model"), ("b", tiny_run.ckpt)):
        assert run_verb(capsys, "export", "--ckpt", str(source), "--out", str(tmp_path / name / "hf"))[0] == 0
        assert run_verb(capsys, "export", "--ckpt", str(source), "--format", "gguf",
                        "--out", str(tmp_path / name / "gguf"))[0] == 0
        assert run_verb(capsys, "export", "--ckpt", str(source), "--format", "azgpt",
                        "--out", str(tmp_path / name / "azgpt"))[0] == 0
    for relative in ("hf/model.safetensors", "hf/config.json", "hf/tokenizer.json", "gguf/gguf-f16.gguf",
                     "azgpt/model.safetensors", "azgpt/config.json", "azgpt/tokenizer.json"):
        assert (tmp_path / "a" / relative).read_bytes() == (tmp_path / "b" / relative).read_bytes(), relative


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "tokenizer.json").unlink(), "not a complete model folder: tokenizer.json missing"),
    (lambda f: (f / "model.safetensors").write_bytes(b"\x00" * 10), "model.safetensors is not readable"),
    (lambda f: (f / "config.json").write_text("{"), "config.json is not readable JSON"),
    (lambda f: (f / "config.json").write_text(json.dumps({**json.loads((f / "config.json").read_text()),
                                                          "format_version": 99})), "written by a newer azgpt"),
    (lambda f: (f / "config.json").write_text(json.dumps({**json.loads((f / "config.json").read_text()),
                                                          "architecture": {"n_embd": 32, "wings": 2}})),
     "bad architecture (['wings'])"),
    (lambda f: (f / "config.json").write_text(json.dumps({**json.loads((f / "config.json").read_text()),
                                                          "shared_weights": {}})),
     "lm_head.weight: missing in the file"),
])
def test_a_damaged_model_folder_is_one_clear_line(tiny_run, tmp_path, capsys, damage, message) -> None:
    folder = tmp_path / "model"
    shutil.copytree(tiny_run.log_dir / "model", folder)
    damage(folder)
    code, out, err = run_verb(capsys, "generate", "--ckpt", str(folder), "--prompt", "Bakı", "--device", "cpu")
    assert code == 2 and out == ""
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_a_folder_without_a_model_is_refused(tmp_path, capsys) -> None:
    code, _, err = run_verb(capsys, "generate", "--ckpt", str(tmp_path), "--prompt", "Bakı")
    assert code == 2 and "is a folder but not a model folder" in err


def test_an_infinite_metric_is_written_as_null_and_the_folder_still_loads(tiny_run, tmp_path) -> None:
    """A diverged run's perplexity can exceed e^709: meta.json stays strict JSON (null, never Infinity)."""
    from azgpt.artifact import load_model, write_model_folder

    model = load_model(tiny_run.ckpt)
    out = write_model_folder(tmp_path / "model", model.config, model.state_dict, model.tokenizer.to_str(),
                             {"metrics": {"val_loss": 710.0, "val_ppl": float("inf")}})
    meta = json.loads((out / "meta.json").read_text(), parse_constant=lambda name: pytest.fail(name))
    assert meta["metrics"] == {"val_loss": 710.0, "val_ppl": None}
    assert load_model(out).summary["metrics"] == {"val_loss": 710.0}


@pytest.mark.parametrize("read_only", [False, True])
def test_a_model_folder_onto_a_full_or_read_only_disk_is_one_line(tiny_run, tmp_path, capsys, read_only) -> None:
    """export --format azgpt onto a 64k tmpfs (full at the weights) or a read-only one: one line, exit 2, nothing
    half-written left behind."""
    from mount_helpers import tmpfs

    with tmpfs(tmp_path / "disk", read_only=read_only) as disk:
        code, out, err = run_verb(capsys, "export", "--ckpt", str(tiny_run.ckpt), "--format", "azgpt",
                                  "--out", str(disk / "model"))
        assert code == 2 and out == ""
        errors = [line for line in err.splitlines() if line.startswith("azgpt: error:")]
        assert len(errors) == 1 and "Traceback" not in err, err
        assert ("read-only" if read_only else "full") in errors[0]
        assert list(disk.iterdir()) == []
