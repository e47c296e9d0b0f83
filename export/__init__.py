"""Exporter: bake a training run into a versioned serving bundle (DESIGN.md §7).

`python -m export --run RUN_DIR --bundles BUNDLES_DIR [--publish] [--quantize int8]` writes
BUNDLES_DIR/vN with user vectors, the item index, popularity, seen items and, when the run has
content heads and encoders, ONNX cold-start encoders whose parity with torch is checked first.
RUN_DIR may be a stage-2 run (train.stage2): its tuned towers are exported (export.tuned). The
run is rebuilt at its best weights by `train.run.load_run`.
"""
from export.bundle import BundleArrays, assemble, export_run
from export.onnx_export import ExportError

__all__ = ["BundleArrays", "ExportError", "assemble", "export_run"]
