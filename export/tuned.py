"""Tuned towers made export-ready (a stage-2 run, rebuilt by `train.run.load_run`).

Export form of a tuned tower: deep prompts stay as the token hook and are traced into the ONNX
graph; LoRA / (IA)^3 adapters are merged into the base weights of a copy (`merge_peft`), so the
graph is a plain tower. Parity is always checked against the tuned tower as trained. A PerPEFT run
(`groups` > 1) exports one graph computing every group's block (train/perpeft.py); merged adapters
then give each group its own copy of the weights.
"""
from __future__ import annotations

import copy

from peft.tuners.tuners_utils import BaseTunerLayer

from export.onnx_export import ExportError
from train.encoders.base import Tower
from train.encoders.peft_methods import PEFT_METHODS, merge_peft
from train.perpeft import GroupedTower
from train.run import Tuning

def deployable(tower: Tower, tuning: Tuning) -> Tower:
    """The tower as it is exported: adapters merged into a copy (plain weights), else itself."""
    method = PEFT_METHODS.get(tuning.method)
    if method is None or not method.merges:
        return tower
    if isinstance(tower, GroupedTower):  # PerPEFT: each group merged into its own weights
        return GroupedTower([deployable(member, tuning) for member in tower.members])
    merged = merge_peft(copy.deepcopy(tower)).eval()
    # as trainable as a freshly built tower: with every weight frozen, nn.MultiheadAttention takes
    # its fused fast path, which the legacy (TorchScript) exporter cannot export
    merged.requires_grad_(True)
    left = [n for n, m in merged.named_modules() if isinstance(m, BaseTunerLayer)]
    if left:
        raise ExportError(f"{tuning.method} adapters left after merging: {left[:3]}")
    return merged
