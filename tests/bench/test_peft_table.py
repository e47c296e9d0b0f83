"""bench.common's stage-2 run directories: keyed by the settings that differ from the defaults."""
from __future__ import annotations

from pathlib import Path

from train.config import Stage2Config

from bench import common as peft_table


def test_stage2_dir_ignores_settings_at_their_defaults(tmp_path):
    stage1 = tmp_path / "ml100k" / "lightgcn_mm" / "999"

    def where(**settings) -> Path:
        s2 = Stage2Config.model_validate(settings).model_dump(mode="json")
        return peft_table.stage2_dir(tmp_path / "out", stage1, "prompt", s2, 999)

    base = where(epochs=2)
    assert base == where(epochs=2, groups=1, group_negatives=True)  # spelled-out defaults
    assert base.parent.parent.name == "lightgcn_mm" and base.name == "999"
    assert base != where(epochs=3) and base != where(epochs=2, groups=2)
    # the runs that start from another variant's runs share one directory across seeds
    starts = [where(epochs=2, groups=2, init_from=str(tmp_path / "prompt-abc" / s))
              for s in ("999", "1000")]
    assert starts[0] == starts[1] != where(epochs=2, groups=2)
