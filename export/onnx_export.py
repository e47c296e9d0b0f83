"""Cold-start encoders as ONNX: tower + content head wrappers, export, int8 quantisation, parity.

The exported image encoder maps a preprocessed image (B, 3, S, S) to `head_image(tower(image))`
(B, d); the text encoder maps token ids (B, L) to `head_text(tower(text))` (B, d). Export uses the
dynamo exporter as a single file (`external_data=False`; SERVING.md §2.3) and falls back to the
TorchScript exporter when dynamo fails. Output names are not op names ("embedding" collides).
Parity runs the torch wrapper on the training preparation and onnxruntime on the serving path
(preprocess.json with Pillow + numpy, tokenizer.json with `tokenizers`): fp32 must agree within
`FP32_TOL` (max abs), int8 (dynamic quantisation) within cosine `INT8_MIN_COS`. The torch side may
differ from the exported tower (`reference`: stage-2 LoRA / (IA)^3, merged, vs the adapters).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from tokenizers import Tokenizer
from torch import Tensor, nn

from export.tokenizer import PARITY_TEXTS, encode_texts, mismatches, tokenizer_for
from index.bundle import IMAGE_ENCODER, PREPROCESS, TEXT_ENCODER, TOKENIZER
from index.manifest import EncoderSpec
from train.encoders.base import Tower
from train.encoders.preprocess import PreprocessSpec, preprocess_images

log = logging.getLogger(__name__)

FP32_TOL = 1e-4
INT8_MIN_COS = 0.99
IMAGE_OUTPUT = "image_vec"
TEXT_OUTPUT = "text_vec"
MAX_BATCH = 65536
EXPORTERS = ("dynamo", "legacy")
INT8_SCHEMES = ("int8-dynamic", "int8-weight-only")  # fastest first, most accurate second


class ExportError(RuntimeError):
    """The export cannot produce a correct bundle (parity, tokenizer or exporter failure)."""


class ImageEncoder(nn.Module):
    """Image tower + its content head: preprocessed images (B, 3, S, S) -> vectors (B, d)."""

    input_names = ["image"]
    output_name = IMAGE_OUTPUT

    def __init__(self, tower: Tower, head: nn.Module) -> None:
        super().__init__()
        self.tower, self.head = tower, head

    def forward(self, image: Tensor) -> Tensor:
        """head(tower(image))."""
        return self.head(self.tower(image))  # (B, d)

    def torch_args(self, prepared: Tensor) -> tuple[Tensor, ...]:
        """Positional inputs from the tower's own preparation."""
        return (prepared,)


class BertTextEncoder(nn.Module):
    """BERT-family text tower + head: (input_ids, attention_mask) (B, L) -> vectors (B, d)."""

    input_names = ["input_ids", "attention_mask"]
    output_name = TEXT_OUTPUT

    def __init__(self, tower: Tower, head: nn.Module) -> None:
        super().__init__()
        self.tower, self.head = tower, head

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """head(tower(text)); token types are all zero for single sentences."""
        prepared = {"input_ids": input_ids, "attention_mask": attention_mask,
                    "token_type_ids": torch.zeros_like(input_ids)}
        return self.head(self.tower(prepared))  # (B, d)

    def torch_args(self, prepared: dict[str, Tensor]) -> tuple[Tensor, ...]:
        """Positional inputs from the tower's own preparation."""
        return prepared["input_ids"], prepared["attention_mask"]


class ClipTextEncoder(nn.Module):
    """open_clip text tower + head: input_ids (B, context_length) -> vectors (B, d)."""

    input_names = ["input_ids"]
    output_name = TEXT_OUTPUT

    def __init__(self, tower: Tower, head: nn.Module) -> None:
        super().__init__()
        self.tower, self.head = tower, head

    def forward(self, input_ids: Tensor) -> Tensor:
        """head(tower(text))."""
        return self.head(self.tower(input_ids))  # (B, d)

    def torch_args(self, prepared: Tensor) -> tuple[Tensor, ...]:
        """Positional inputs from the tower's own preparation."""
        return (prepared,)


def _dynamo_shapes(names: list[str], axes: dict[int, str], max_len: int) -> dict:
    """torch.export Dims for the named inputs (shared Dim objects per axis label)."""
    dims = {"batch": torch.export.Dim("batch", min=1, max=MAX_BATCH),
            "length": torch.export.Dim("length", min=2, max=max(max_len, 3))}
    return {name: {axis: dims[label] for axis, label in axes.items()} for name in names}


def _export_once(encoder: nn.Module, args: tuple, path: Path, axes: dict[int, str],
                 max_len: int, exporter: str) -> None:
    """One torch.onnx.export call with the given exporter."""
    names, out = encoder.input_names, encoder.output_name
    with warnings.catch_warnings(), contextlib.redirect_stdout(None), _quiet_loggers(
            "onnx_ir", "onnxscript", "torch.onnx", "torch.export", "torch._dynamo"):
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            torch.onnx.export(encoder, args, str(path), dynamo=True, external_data=False,
                              input_names=names, output_names=[out], verbose=False,
                              dynamic_shapes=_dynamo_shapes(names, axes, max_len))
        else:
            dynamic = {n: dict(axes) for n in names} | {out: {0: "batch"}}
            torch.onnx.export(encoder, args, str(path), dynamo=False, opset_version=17,
                              input_names=names, output_names=[out], dynamic_axes=dynamic)


def _check_graph(path: Path, encoder: nn.Module) -> None:
    """A single self-contained file with exactly the contracted input and output names."""
    model = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(model)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        raise ExportError(f"{path.name}: ONNX model refers to external data")
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    if inputs != encoder.input_names or outputs != [encoder.output_name]:
        raise ExportError(f"{path.name}: graph IO {inputs} -> {outputs}, expected "
                          f"{encoder.input_names} -> {[encoder.output_name]}")


def export_encoder(encoder: nn.Module, args: tuple, path: Path, axes: dict[int, str],
                   max_len: int = 2, exporter: str = "dynamo") -> str:
    """Export to one ONNX file (dynamo, else legacy); returns the exporter that worked."""
    encoder.eval()
    order = [exporter] + [e for e in EXPORTERS if e != exporter]
    errors = []
    for name in order:
        try:
            _export_once(encoder, args, path, axes, max_len, name)
            _check_graph(path, encoder)
        except Exception as err:  # noqa: BLE001 - any exporter failure falls back to the next one
            log.warning("%s export of %s failed: %s", name, path.name, str(err)[:500])
            errors.append(f"{name}: {str(err)[:300]}")
            for leftover in (path, path.with_name(path.name + ".data")):
                leftover.unlink(missing_ok=True)
            continue
        log.info("exported %s with the %s exporter (%.1f MB)", path.name, name,
                 path.stat().st_size / 2**20)
        return name
    raise ExportError(f"could not export {path.name}: " + "; ".join(errors))


def session(path: Path | str, threads: int = 2) -> ort.InferenceSession:
    """A CPU onnxruntime session with a fixed number of intra-op threads."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@contextlib.contextmanager
def _quiet_loggers(*names: str):
    """Mute chatty loggers (the quantisers log every node on the root logger) meanwhile."""
    loggers = [logging.getLogger(n) for n in names] or [logging.getLogger()]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def quantize_int8(src: Path, dst: Path, scheme: str = "int8-dynamic") -> None:
    """int8 MatMul weights: dynamic (per-channel weights, per-tensor activations) or weight-only."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                 MatMulNBitsQuantizer)

    model = onnx.load(str(src))
    del model.graph.value_info[:]  # dynamo's value_info can contradict shape inference
    with _quiet_loggers():
        if scheme == "int8-weight-only":
            config = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True,
                                                  accuracy_level=4, bits=8)
            quantizer = MatMulNBitsQuantizer(model, algo_config=config)
            quantizer.process()
            quantizer.model.save_model_to_file(str(dst), use_external_data_format=False)
            return
        plain = dst.with_name(dst.name + ".in.onnx")
        onnx.save(model, str(plain))
        try:
            quantize_dynamic(str(plain), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=["MatMul", "Gemm"])
        finally:
            plain.unlink(missing_ok=True)


def quantize_checked(src: Path, dst: Path,
                     min_cosine: Callable[[Path], float]) -> tuple[str, float]:
    """The first int8 scheme whose min cosine to torch reaches INT8_MIN_COS; (scheme, cosine)."""
    tried = []
    for scheme in INT8_SCHEMES:
        quantize_int8(src, dst, scheme)
        cos = min_cosine(dst)
        tried.append(f"{scheme}: {cos:.4f}")
        if cos >= INT8_MIN_COS:
            log.info("%s: %s, min cosine to torch %.5f", src.name, scheme, cos)
            return scheme, cos
        log.warning("%s: %s reaches only cosine %.4f", src.name, scheme, cos)
    dst.unlink(missing_ok=True)
    raise ExportError(f"{src.name}: int8 cosine to torch below {INT8_MIN_COS} with every scheme "
                      f"({', '.join(tried)}); export without --quantize")


def run_session(sess: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The single output of a session for the given feeds."""
    return sess.run(None, feeds)[0]


def torch_vectors(encoder: nn.Module, tower: Tower, raw: list, batch: int) -> np.ndarray:
    """Reference vectors: the training preparation and the torch wrapper, in batches."""
    rows = []
    with torch.inference_mode():
        for start in range(0, len(raw), batch):
            prepared, _ = tower.prepare_counted(raw[start:start + batch])
            rows.append(encoder(*encoder.torch_args(prepared)).float().numpy())
    return np.concatenate(rows)


def onnx_vectors(path: Path, serving_inputs: Callable[[list], dict[str, np.ndarray]], raw: list,
                 batch: int, singles: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Serving-path vectors in batches, plus the first `singles` items encoded one at a time."""
    sess = session(path)
    rows = [run_session(sess, serving_inputs(raw[s:s + batch])) for s in range(0, len(raw), batch)]
    ones = [run_session(sess, serving_inputs(raw[i:i + 1])) for i in range(min(singles, len(raw)))]
    return np.concatenate(rows), np.concatenate(ones) if ones else np.zeros((0, 1), np.float32)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity (rows of zeros count as similarity 1 with zeros)."""
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    dot = (a * b).sum(axis=1)
    both_zero = (na == 0) & (nb == 0)
    return np.where(both_zero, 1.0, dot / np.maximum(na * nb, 1e-30))


def compare(reference: np.ndarray, batched: np.ndarray, singles: np.ndarray) -> dict[str, float]:
    """Max abs difference and min cosine of ONNX outputs (batched and single) to the reference."""
    if batched.shape != reference.shape:
        raise ExportError(f"ONNX output shape {batched.shape} != torch {reference.shape}")
    ref_single = reference[:len(singles)]
    diff = max(float(np.abs(batched - reference).max(initial=0.0)),
               float(np.abs(singles - ref_single).max(initial=0.0)))
    cos = min(float(cosines(batched, reference).min(initial=1.0)),
              float(cosines(singles, ref_single).min(initial=1.0)))
    return {"max_abs": diff, "cos_min": cos}


def check_fp32(name: str, stats: dict[str, float]) -> None:
    """Refuse an fp32 encoder whose outputs differ from torch by more than FP32_TOL."""
    if not np.isfinite(stats["max_abs"]) or stats["max_abs"] > FP32_TOL:
        raise ExportError(f"{name}: ONNX (fp32) differs from torch by max abs "
                          f"{stats['max_abs']:.3g} > {FP32_TOL:g}")


def replace_file(src: Path, dst: Path) -> None:
    """Move src over dst (same directory)."""
    os.replace(src, dst)


PARITY_BATCH = 16
EXAMPLE_TEXTS = ["a red shoe", "a rather longer example sentence used to trace the text encoder"]


def _export_checked(encoder: nn.Module, tower: Tower, raw: list, example: list,
                    serving: Callable[[list], dict[str, np.ndarray]], path: Path,
                    axes: dict[int, str], max_len: int, quantize: str | None,
                    exporter: str, expected: nn.Module | None = None
                    ) -> tuple[dict[str, float], np.ndarray]:
    """Export, check fp32 parity against `expected` (default: the exported module itself),
    optionally quantise; (metrics, final ONNX vectors of `raw`)."""
    prepared, _ = tower.prepare_counted(example)
    used = export_encoder(encoder, encoder.torch_args(prepared), path, axes, max_len, exporter)
    torch_side = expected if expected is not None else encoder
    reference = torch_vectors(torch_side.eval(), tower, raw, PARITY_BATCH)
    batched, singles = onnx_vectors(path, serving, raw, PARITY_BATCH)
    stats = compare(reference, batched, singles)
    check_fp32(path.name, stats)
    metrics = {"max_abs": stats["max_abs"], "cos_min": stats["cos_min"],
               "dynamo": float(used == "dynamo"), "items": float(len(raw))}
    if quantize == "int8":
        int8 = path.with_name(path.stem + ".int8.onnx")
        scheme, metrics["int8_cos_min"] = quantize_checked(path, int8, lambda p: compare(
            reference, *onnx_vectors(p, serving, raw, PARITY_BATCH))["cos_min"])
        metrics["int8_weight_only"] = float(scheme == "int8-weight-only")
        replace_file(int8, path)
        batched = onnx_vectors(path, serving, raw, PARITY_BATCH, singles=0)[0]
    log.info("%s parity: %s", path.name, ", ".join(f"{k}={v:.3g}" for k, v in metrics.items()))
    return metrics, batched


def export_image(tower: Tower, head: nn.Module, images: list, workdir: Path,
                 quantize: str | None, exporter: str,
                 reference: Tower | None = None) -> tuple[dict[str, float], np.ndarray]:
    """image_encoder.onnx + preprocess.json; parity on `images` through the serving path, against
    head(reference) when given (`tower` is then its export-ready form), else head(tower)."""
    spec_json = json.dumps(tower.preprocess_spec(), indent=2) + "\n"
    (workdir / PREPROCESS).write_text(spec_json, encoding="utf-8")
    spec = PreprocessSpec.model_validate_json((workdir / PREPROCESS).read_text(encoding="utf-8"))
    if spec.size[0] != spec.size[1]:
        raise ExportError(f"image tower input {spec.size} is not square")

    def serving(chunk: list) -> dict[str, np.ndarray]:
        return {"image": preprocess_images(chunk, spec)[0]}

    expected = ImageEncoder(reference, head) if reference is not None else None
    return _export_checked(ImageEncoder(tower, head).eval(), tower, images, [None, None], serving,
                           workdir / IMAGE_ENCODER, {0: "batch"}, 2, quantize, exporter, expected)


def export_text(tower: Tower, head: nn.Module, texts: list[str], all_texts: list[str],
                workdir: Path, quantize: str | None, exporter: str,
                reference: Tower | None = None
                ) -> tuple[dict[str, float], np.ndarray, str, list[str]]:
    """text_encoder.onnx + tokenizer.json; tokenizer parity on `all_texts`, encoder on `texts`
    (against head(reference) when given, else head(tower))."""
    try:
        built, kind, names = tokenizer_for(tower)
    except ValueError as err:
        raise ExportError(f"text tower: {err}") from err
    (workdir / TOKENIZER).write_text(built.to_str(pretty=True), encoding="utf-8")
    tokenizer = Tokenizer.from_file(str(workdir / TOKENIZER))
    bad = mismatches(tower, tokenizer, names, PARITY_TEXTS + all_texts)
    if bad:
        raise ExportError(f"tokenizer.json differs from the training tokenisation on {len(bad)} "
                          f"texts, e.g. {bad[0][:80]!r}")
    wrapper = BertTextEncoder if kind == "bert" else ClipTextEncoder
    encoder = wrapper(tower, head).eval()
    expected = wrapper(reference, head) if reference is not None else None
    axes = {0: "batch", 1: "length"} if kind == "bert" else {0: "batch"}
    metrics, vectors = _export_checked(
        encoder, tower, texts, EXAMPLE_TEXTS, lambda chunk: encode_texts(tokenizer, chunk, names),
        workdir / TEXT_ENCODER, axes, _context_length(tower), quantize, exporter, expected)
    metrics["tokenizer_texts"] = float(len(PARITY_TEXTS) + len(all_texts))
    return metrics, vectors, kind, names


def _context_length(tower: Tower) -> int:
    """Tokens per text: the sentence tower's truncation or the open_clip context length."""
    return int(getattr(tower, "max_seq_length", None) or tower.context_length)


def scheme(metrics: dict[str, float], quantize: str | None) -> str:
    """The quantisation an encoder ended up with, from its parity metrics."""
    if quantize is None:
        return "none"
    return "int8-weight-only" if metrics.get("int8_weight_only") else "int8-dynamic"


def encoder_spec(image_tower: Tower | None, text_tower: Tower | None, kind: str,
                 names: list[str], quantization: dict[str, str],
                 extra: dict | None = None) -> EncoderSpec:
    """The manifest's encoder contract (placeholders for the fields of an absent tower); `extra`
    holds further fields: the stage-2 ones (encoder_tuning, tuned_modalities, n_ctx, prompt_depth)
    and the attribute encoder's files (attributes_file, attributes_head), if any."""
    image = image_tower.preprocess_spec() if image_tower is not None else {
        "size": (224, 224), "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
    has_text = text_tower is not None
    return EncoderSpec(
        image_size=image["size"][0], mean=image["mean"], std=image["std"],
        interpolation=image.get("interpolation", "bicubic"),
        resize_mode=image.get("resize_mode", "shortest"),
        context_length=_context_length(text_tower) if has_text else 1,
        tokenizer=kind if has_text else "bert",
        image_encoder=IMAGE_ENCODER if image_tower is not None else None,
        text_encoder=TEXT_ENCODER if has_text else None,
        tokenizer_file=TOKENIZER if has_text else None,
        preprocess_file=PREPROCESS if image_tower is not None else None,
        text_inputs=names if has_text else [],
        text_padding="longest" if kind == "bert" else "fixed",
        image_quantization=quantization.get("image", "none"),
        text_quantization=quantization.get("text", "none"), **(extra or {}))
