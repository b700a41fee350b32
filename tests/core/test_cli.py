"""Bad input on the command line: one clear line naming the file, record or field, and exit code 2."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from deepmedix.cli import app

runner = CliRunner()


def test_bad_override_names_the_key(tmp_path):
    r = runner.invoke(app, ["data", "phantom", "--out", str(tmp_path / "d"), "--set", "n_patients=many"])
    assert r.exit_code == 2
    assert "key 'n_patients': expected int" in r.output
    assert not (tmp_path / "d").exists()


def test_missing_dataset_names_the_path(tmp_path):
    r = runner.invoke(app, ["train", "sft", "--data", str(tmp_path / "nope"), "--model", str(tmp_path),
                            "--out", str(tmp_path / "o")])
    assert r.exit_code == 2
    assert str(tmp_path / "nope") in r.output and "no such file or folder" in r.output


def test_corrupt_shard_names_the_file(small_data, base_model_dir, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    bad = data / "records" / "train-00000.parquet"
    bad.write_bytes(b"not parquet")
    r = runner.invoke(app, ["train", "sft", "--data", str(data), "--model", str(base_model_dir),
                            "--out", str(tmp_path / "o")])
    assert r.exit_code == 2
    assert "train-00000.parquet" in r.output and "not a readable Parquet shard" in r.output
    assert not (tmp_path / "o").exists()


def test_phantom_command_writes_a_dataset(tmp_path):
    r = runner.invoke(app, ["data", "phantom", "--out", str(tmp_path / "d"), "--set", "n_patients=2",
                            "--set", "image_size=64"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout[r.stdout.index("{"):r.stdout.rindex("}") + 1])
    assert result["stage"] == "curate" and result["after"] > 0
    assert (tmp_path / "d" / "lineage.json").exists()


def test_serve_with_a_missing_model_fails_clearly(tmp_path):
    r = runner.invoke(app, ["serve", "--model", str(tmp_path / "nope"), "--port", "0"])
    assert r.exit_code == 2
    assert "nope" in r.output and "no such file or folder" in r.output


def test_unparsable_override_names_the_key(tmp_path):
    r = runner.invoke(app, ["data", "phantom", "--out", str(tmp_path / "d"), "--set", "n_patients=[1"])
    assert r.exit_code == 2 and "'n_patients' is not valid YAML" in r.output


def test_only_the_librarys_errors_become_one_line_a_bug_keeps_its_traceback():
    import typer

    from deepmedix.cli import cli_errors
    from deepmedix.errors import DeepMedixError, InputError, MissingInputError

    for exc in (InputError("field 'x': bad"), MissingInputError("f.yaml: missing"), DeepMedixError("store down")):
        with pytest.raises(typer.Exit) as e:
            with cli_errors():
                raise exc
        assert e.value.exit_code == 2
    assert issubclass(InputError, ValueError) and issubclass(MissingInputError, FileNotFoundError)
    with pytest.raises(KeyError):  # not ours: a bug, raised as it is
        with cli_errors():
            raise KeyError("bug")
    with pytest.raises(ValueError, match="bug"):  # a bare ValueError is no longer taken for bad input
        with cli_errors():
            raise ValueError("bug")


def test_pipeline_parameters_file_errors_name_the_file_and_key(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("bogus: 1\n")
    for path, msg in ((bad, "'bogus' is not a pipeline parameter"),
                      (tmp_path / "nope.yaml", "cannot read the parameters file")):
        r = runner.invoke(app, ["pipeline", "submit", "--host", "http://127.0.0.1:9", "--params", str(path)])
        assert r.exit_code == 2, r.output
        assert str(path) in r.output and msg in r.output


def test_serve_refuses_bad_batching_settings_in_one_line(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).with_name("deepmedix")
    r = subprocess.run([str(exe), "serve", "--model", str(tmp_path), "--max-batch-size", "0", "--port", "0"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "max_batch_size and max_queue must be >= 1" in r.stderr
    assert "Traceback" not in r.stderr


def test_the_7b_base_model_is_a_checkpoint_the_user_supplies(small_data, tmp_path):
    from deepmedix import stages
    from deepmedix.config import ConfigError

    r = runner.invoke(app, ["model", "tiny", "--out", str(tmp_path / "m"), "-c", "7b"])
    assert r.exit_code == 2 and "base_model_uri" in r.output and not (tmp_path / "m").exists()
    with pytest.raises(ConfigError, match="build: checkpoint needs a model to start from"):
        stages.base_model(str(small_data), str(tmp_path / "m"), "7b")
    assert not (tmp_path / "m").exists()


def test_pipeline_parameters_name_a_size_every_stage_has(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("size: 13b\n")
    r = runner.invoke(app, ["pipeline", "submit", "--host", "http://127.0.0.1:9", "--params", str(p)])
    assert r.exit_code == 2 and "size '13b': no config for configs/curate/13b.yaml" in " ".join(r.output.split())
