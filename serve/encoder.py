"""Cold-start item encoder: the bundle's ONNX towers run by onnxruntime, torch-free.

Contract with the exporter (index.manifest.EncoderSpec): the image tower takes "image", float32
(B, 3, S, S) preprocessed as preprocess.json says, and returns "image_vec" (B, d); the text tower
takes the int64 (B, L) inputs named in `text_inputs` and returns "text_vec" (B, d). Both outputs
already live in the user space (content heads are baked in). A bundle may also ship an attribute
encoder (attributes.json + attributes_head.npy, index/attributes.py): fields parsed from the text
with the vocabularies training fitted, then the linear attribute head, in numpy. Fusion "mean"
averages the parts present; the result is L2-normalised when the manifest says vectors are
normalised.

Text is tokenised with the bundle's tokenizer.json (`tokenizers`) exactly as exported: its own
truncation and padding settings are kept (the exporter bakes in the training tokenisation: BERT
truncates to max_seq_length and pads to the longest, CLIP pads to its fixed context). Only what
the file leaves unset is filled in: truncation to `context_length`, and padding to L when the
ONNX text input has a static length L. Input names are mapped by role: a name containing "mask"
gets the attention mask, one containing "type" the token type ids, any other the token ids.

A missing image is the blank mean-colour image and a missing text the empty string, as in
training; with only one tower in the bundle, that tower's input is required.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from index.attributes import AttributeHead, AttributesSpec
from index.preprocess import (DEFAULT_MAX_ASPECT, DEFAULT_MAX_PIXELS, ImageError, ImageSpec,
                              blank, preprocess)
from serve.errors import InvalidArgument, refused_image

log = logging.getLogger(__name__)

IMAGE_INPUT, IMAGE_OUTPUT, TEXT_OUTPUT = "image", "image_vec", "text_vec"
_ORT_INT = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}


def make_session(path: Path, threads: int = 1) -> ort.InferenceSession:
    """An onnxruntime session on CUDA when available, else CPU, with `threads` intra-op threads."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    available = ort.get_available_providers()
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers)


def _check_io(session: ort.InferenceSession, inputs: list[str], output: str, path: Path) -> None:
    """ValueError unless the session has exactly the contract's input and output names."""
    have_in = sorted(i.name for i in session.get_inputs())
    have_out = [o.name for o in session.get_outputs()]
    if have_in != sorted(inputs) or output not in have_out:
        raise ValueError(f"{path.name}: expected inputs {sorted(inputs)} and output {output!r}, "
                         f"found inputs {have_in} and outputs {have_out}")


def static_length(session: ort.InferenceSession) -> int | None:
    """The fixed sequence length L of a text tower's (B, L) inputs, or None when dynamic."""
    dims = session.get_inputs()[0].shape
    return dims[1] if len(dims) == 2 and isinstance(dims[1], int) else None


def load_tokenizer(path: Path, context_length: int, fixed_length: int | None = None) -> Tokenizer:
    """tokenizer.json as exported; truncation and fixed-length padding added only if missing."""
    tokenizer = Tokenizer.from_file(str(path))
    if tokenizer.truncation is None:
        tokenizer.enable_truncation(max_length=fixed_length or context_length)
    pad = tokenizer.padding or {}
    if fixed_length is not None and pad.get("length") != fixed_length:
        tokenizer.enable_padding(length=fixed_length, pad_id=pad.get("pad_id", 0),
                                 pad_token=pad.get("pad_token", "[PAD]"),
                                 pad_type_id=pad.get("pad_type_id", 0))
    return tokenizer


class ItemEncoder:
    """Image and/or text tower plus preprocessing: raw item -> one (d,) vector."""

    def __init__(self, dim: int, normalize: bool, image_session: ort.InferenceSession | None,
                 image_spec: ImageSpec | None, text_session: ort.InferenceSession | None,
                 tokenizer: Tokenizer | None, text_inputs: list[str],
                 max_pixels: int = DEFAULT_MAX_PIXELS, attributes: AttributeHead | None = None):
        if image_session is None and text_session is None and attributes is None:
            raise ValueError("an item encoder needs an image tower, a text tower or attributes")
        if attributes is not None and attributes.out_dim != dim:
            raise ValueError(f"the attribute head returns {attributes.out_dim}-d vectors, the "
                             f"bundle's dimension is {dim}")
        if (image_session is None) != (image_spec is None):
            raise ValueError("the image tower needs its preprocessing spec")
        if (text_session is None) != (tokenizer is None):
            raise ValueError("the text tower needs its tokenizer")
        self.dim, self.normalize, self.max_pixels = dim, normalize, max_pixels
        self.max_aspect: float | None = DEFAULT_MAX_ASPECT
        self.image_session, self.image_spec = image_session, image_spec
        self.text_session, self.tokenizer, self.text_inputs = text_session, tokenizer, text_inputs
        self.attributes = attributes
        self._text_dtypes = {} if text_session is None else {
            i.name: _ORT_INT.get(i.type, np.int64) for i in text_session.get_inputs()}

    @classmethod
    def from_files(cls, dim: int, normalize: bool, image_onnx: Path | None = None,
                   image_spec: ImageSpec | None = None, text_onnx: Path | None = None,
                   tokenizer_json: Path | None = None, context_length: int = 77,
                   text_inputs: list[str] | None = None, threads: int = 1,
                   attributes_json: Path | None = None,
                   attributes_head: Path | None = None) -> ItemEncoder:
        """Open the ONNX files, tokenizer and attribute encoder, checking the contract's IO names."""
        text_inputs = list(text_inputs or ["input_ids", "attention_mask"])
        image_session = text_session = tokenizer = None
        if image_onnx is not None:
            image_session = make_session(image_onnx, threads)
            _check_io(image_session, [IMAGE_INPUT], IMAGE_OUTPUT, image_onnx)
        if text_onnx is not None:
            if tokenizer_json is None:
                raise ValueError("a text encoder needs a tokenizer file")
            text_session = make_session(text_onnx, threads)
            _check_io(text_session, text_inputs, TEXT_OUTPUT, text_onnx)
            tokenizer = load_tokenizer(tokenizer_json, context_length, static_length(text_session))
        attributes = None
        if (attributes_json is None) != (attributes_head is None):
            raise ValueError("the attribute encoder needs both attributes.json and its head")
        if attributes_json is not None:
            spec = AttributesSpec.model_validate_json(attributes_json.read_text(encoding="utf-8"))
            attributes = AttributeHead(spec, np.load(attributes_head, allow_pickle=False))
        return cls(dim, normalize, image_session, image_spec, text_session, tokenizer, text_inputs,
                   attributes=attributes)

    @property
    def has_image(self) -> bool:
        """Whether the bundle ships an image tower."""
        return self.image_session is not None

    @property
    def has_text(self) -> bool:
        """Whether the bundle ships a text tower."""
        return self.text_session is not None

    @property
    def has_attributes(self) -> bool:
        """Whether the bundle ships an attribute encoder (it reads the text)."""
        return self.attributes is not None

    def encode(self, image: bytes, text: str) -> np.ndarray:
        """One item (encoded image bytes, text) -> (d,) float32; InvalidArgument on bad input."""
        if not self.has_image and not text:
            raise InvalidArgument("this bundle encodes items from text only; text is required")
        if not self.has_text and not self.has_attributes and not image:
            raise InvalidArgument("this bundle encodes items from images only; image is required")
        try:
            pixels = (preprocess(image, self.image_spec, self.max_pixels, self.max_aspect) if self.has_image
                      else None)
        except ImageError as err:
            raise refused_image(err) from err
        return self.encode_arrays(pixels, text)

    def encode_blank(self) -> np.ndarray:
        """Vector of an item with a blank image and empty text (the reload smoke test)."""
        return self.encode_arrays(blank(self.image_spec) if self.has_image else None, "")

    def encode_arrays(self, pixels: np.ndarray | None, text: str) -> np.ndarray:
        """Preprocessed (3, S, S) pixels and raw text -> fused (d,) vector."""
        parts = []
        if self.has_image:
            feed = {IMAGE_INPUT: pixels[None].astype(np.float32, copy=False)}  # (1, 3, S, S)
            parts.append(self._run(self.image_session, IMAGE_OUTPUT, feed))
        if self.has_text:
            parts.append(self._run(self.text_session, TEXT_OUTPUT, self._text_feed(text)))
        if self.has_attributes:  # (d,): finite by construction (0/1 slots, checked matrix)
            parts.append(self.attributes([text])[0])
        vec = np.mean(parts, axis=0)  # (d,)
        if self.normalize:
            norm = float(np.linalg.norm(vec))
            vec = vec / norm if norm > 0 else vec
        return vec.astype(np.float32)

    def _text_feed(self, text: str) -> dict[str, np.ndarray]:
        """ONNX feed of one text: ids, attention mask and type ids by input name, (1, L) each."""
        enc = self.tokenizer.encode(text)
        feed = {}
        for name in self.text_inputs:
            values = enc.attention_mask if "mask" in name else (
                enc.type_ids if "type" in name else enc.ids)
            feed[name] = np.asarray([values], dtype=self._text_dtypes.get(name, np.int64))
        return feed

    def _run(self, session: ort.InferenceSession, output: str,
             feed: dict[str, np.ndarray]) -> np.ndarray:
        """Run one tower and check its (1, d) finite output."""
        (out,) = session.run([output], feed)
        out = np.asarray(out, dtype=np.float32)
        if out.shape != (1, self.dim) or not np.isfinite(out).all():
            raise RuntimeError(f"encoder output {output!r} has shape {out.shape} or non-finite "
                               f"values; expected (1, {self.dim})")
        return out[0]
