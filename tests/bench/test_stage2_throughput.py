"""bench.stage2_throughput on the tiny towers: the step it times is stage 2's (PEFT attached,
only the method's parameters train), and the Baby-epoch projection is arithmetic on that."""
from __future__ import annotations

import pytest


from bench import stage2_throughput as bench


@pytest.mark.parametrize("modality,method", [("image", "prompt"), ("text", "lora"),
                                             ("image", "ia3"), ("text", "frozen")])
def test_measure_tiny_tower(modality, method):
    args = bench.parse_args(["--towers", "tiny", "--batch", "4", "--steps", "2", "--warmup", "1",
                             "--threads", "1"])
    enc = dict(bench.TOWERS["tiny"])[modality]
    row = bench.measure("tiny", modality, enc, method, args)
    assert row["items_per_s"] > 0 and row["step_s"] > 0 and row["peak_mib"] > 0
    assert row["batch"] == 4 and row["precision"] == "fp32"
    if method == "frozen":
        assert row["trainable"] == 0
    else:  # the PEFT method's parameters only: a small share of the tower
        assert 0 < row["trainable"] < 0.1 * row["tower_params"]


def test_baby_epoch_projection():
    # 935 steps of 128 items at 128 items/s: one second per step
    assert bench.baby_epoch_s(128.0, 128) == pytest.approx(935.0)
    assert bench.baby_epoch_s(119_680.0, 128) == pytest.approx(1.0)


def test_main_prints_table_and_summary(capsys, tmp_path):
    out = tmp_path / "rows.json"
    rc = bench.main(["--towers", "tiny", "--methods", "prompt", "--batch", "4", "--steps", "1",
                     "--warmup", "1", "--threads", "1", "--in-process", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "| tiny | image | prompt | fp32 |" in text and "| tiny | text | prompt | fp32 |" in text
    assert "tiny prompt (image + text): Baby stage-2 epoch" in text
    assert out.is_file()
