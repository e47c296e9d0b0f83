"""train.run: metrics.json through RunMetrics, the run's configs, the CLIs' config errors."""
from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from export.retrain import main as retrain_main
from train.__main__ import main as train_main
from train.distill import main as distill_main
from train.run import METRICS, read_configs, read_metrics, write_metrics
from train.stage2 import main as stage2_main

GOOD = {"valid": {"recall@20": 0.25}, "test": {"recall@20": 0.2}, "best_epoch": 3,
        "epochs_run": 5, "cold_start": {"heads": {"recall@20": 0.4}}}


def test_metrics_round_trip_keeps_extras_and_bytes(tmp_path):
    write_metrics(tmp_path, GOOD)
    assert (tmp_path / METRICS).read_text() == json.dumps(GOOD, indent=2)
    m = read_metrics(tmp_path)
    assert m.valid["recall@20"] == 0.25 and m.best_epoch == 3
    assert m.model_dump()["cold_start"] == GOOD["cold_start"]


def test_bad_metrics_are_refused_before_writing(tmp_path):
    with pytest.raises(ValidationError, match="best_epoch"):
        write_metrics(tmp_path, {"valid": {}, "test": {}, "epochs_run": 1})
    assert not (tmp_path / METRICS).exists()
    with pytest.raises(FileNotFoundError, match="finished run"):
        read_metrics(tmp_path)


def test_read_configs_names_a_missing_stage1_config(tmp_path):
    (tmp_path / "stage2.yaml").write_text("epochs: 2\n")
    with pytest.raises(FileNotFoundError, match="stage1_config.yaml"):
        read_configs(tmp_path)


@pytest.mark.parametrize("entry", ["train", "stage2", "distill", "retrain"])
def test_bad_yaml_is_one_line_with_file_and_line(entry, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 2\nmethod: [unclosed\n")
    argv = {"train": ["--config", str(bad)],
            "stage2": ["--run", str(tmp_path), "--config", str(bad), "--out", str(tmp_path / "o")],
            "distill": ["--teacher", str(tmp_path), "--config", str(bad),
                        "--out", str(tmp_path / "o")],
            "retrain": ["--config", str(bad), "--bundles", str(tmp_path / "b")]}[entry]
    main = {"train": train_main, "stage2": stage2_main, "distill": distill_main,
            "retrain": retrain_main}[entry]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{bad}:3: invalid YAML" in err and "Traceback" not in err


def test_invalid_field_names_file_and_field(tmp_path, capsys):
    bad = tmp_path / "s2.yaml"
    bad.write_text("epochs: 0\n")
    assert stage2_main(["--run", str(tmp_path), "--config", str(bad),
                        "--out", str(tmp_path / "o")]) == 2
    assert f"{bad}: optim.epochs: Input should be greater than or equal to 1" in capsys.readouterr().err
