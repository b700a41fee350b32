"""Bad input on the command line: one clear line naming the file, record or field, and exit code 2."""

from __future__ import annotations

import json

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
