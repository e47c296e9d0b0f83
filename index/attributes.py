"""Structured item attributes parsed from the item text: categories, tag lists and numbers.

Item texts often carry structure a sentence encoder blurs: "Toy Story (1995). Genres: Animation
Children's Comedy. ..." holds a release year and a genre list; a shop's "Brand: X. Category: Y."
holds brand and category. An attribute field is a regular expression whose first capture group,
found in the item text, gives the value:

- `category`: the value is one label (one-hot over the labels seen in the catalogue);
- `tags`: the value is split into labels (multi-hot);
- `number`: the value is a number, bucketed by `bins` (one-hot over len(bins) + 1 buckets), or by
  `quantiles: Q` edges fitted on the catalogue (so a newer catalogue does not fall into one bucket).

Fitting checks coverage: a field that matches fewer than `min_coverage` of the items is a warning
naming it with an example text; a field that matches no item is an AttributeCoverageError unless
`allow_unmatched` (a pattern that never matches is almost always a typo, and silently yields a
constant feature).

Labels seen in fewer than `min_count` catalogue items share an "other" slot; a text where the
pattern does not match leaves the field's slots at zero. The resolved spec (fields plus the
fitted vocabularies) is what a bundle ships, so serving encodes a new item's text with exactly the
vocabulary training used, without torch. Torch-free: the trainer and the server both import it.
"""
from __future__ import annotations

import bisect
import logging
import re
from collections import Counter
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

log = logging.getLogger(__name__)


class AttributeCoverageError(ValueError):
    """An attribute field matches no item of the catalogue."""


class AttributeField(BaseModel):
    """One attribute: where it sits in the text and how it becomes slots of the feature vector."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    pattern: str = Field(description="regular expression; its first capture group is the value")
    kind: Literal["category", "tags", "number"]
    separator: str | None = Field(None, description="tags: split on this (None = whitespace)")
    bins: list[float] = Field(default_factory=list, description="number: sorted bucket edges; a "
                              "value v falls in bucket #{edges <= v}")
    quantiles: int | None = Field(None, ge=2, description="number: fit len-1 bucket edges at the "
                                  "catalogue's quantiles instead of hand-written bins")
    min_count: int = Field(1, ge=1, description="category/tags: rarer labels share one slot")

    @field_validator("pattern")
    @classmethod
    def _one_group(cls, pattern: str) -> str:
        try:
            compiled = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"invalid regular expression {pattern!r}: {e}") from None
        if compiled.groups < 1:
            raise ValueError(f"pattern {pattern!r} needs a capture group holding the value")
        return pattern

    @model_validator(mode="after")
    def _kind_options(self) -> AttributeField:
        if self.kind == "number":
            if not self.bins and self.quantiles is None:
                raise ValueError(f"attribute {self.name!r}: a number needs bins (bucket edges) "
                                 "or quantiles")
            if self.bins and self.quantiles is not None:
                raise ValueError(f"attribute {self.name!r}: give bins or quantiles, not both")
            if any(b >= c for b, c in zip(self.bins, self.bins[1:])):
                raise ValueError(f"attribute {self.name!r}: bins must be strictly increasing")
        elif self.bins or self.quantiles is not None:
            raise ValueError(f"attribute {self.name!r}: bins and quantiles apply to kind number "
                             "only")
        if self.separator is not None and self.kind != "tags":
            raise ValueError(f"attribute {self.name!r}: separator applies to kind tags only")
        return self

    def _value(self, text: str) -> str | None:
        """The stripped first group of the pattern's first match in `text`, or None."""
        match = re.search(self.pattern, text)
        return None if match is None or match.group(1) is None else match.group(1).strip()

    def labels(self, text: str) -> list[str] | None:
        """The labels of a category/tags field in `text` (None when the pattern does not match)."""
        value = self._value(text)
        if value is None:
            return None
        if self.kind == "tags":
            return [t.strip() for t in value.split(self.separator) if t.strip()]
        return [value] if value else []

    def number(self, text: str) -> float | None:
        """The value of a number field in `text` (None when absent or not a number)."""
        value = self._value(text)
        if value is None:
            return None
        try:
            value = float(value.replace(",", ""))
        except ValueError:
            return None
        return value if np.isfinite(value) else None


class AttributesConfig(BaseModel):
    """The `encoders.attributes` entry of a run config."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["attributes"] = "attributes"
    fields: list[AttributeField] = Field(min_length=1)
    min_coverage: float = Field(0.05, ge=0.0, le=1.0, description="warn about a field that "
                                "matches fewer than this share of the items")
    allow_unmatched: bool = Field(False, description="accept a field that matches no item "
                                  "(else fitting fails naming it)")

    @field_validator("fields")
    @classmethod
    def _unique_names(cls, fields: list[AttributeField]) -> list[AttributeField]:
        names = [f.name for f in fields]
        if len(set(names)) != len(names):
            raise ValueError(f"attribute names must be unique, got {names}")
        return fields


def _matches(f: AttributeField, text: str) -> bool:
    """Whether the field finds a value in the text."""
    return (f.number(text) if f.kind == "number" else f.labels(text)) is not None


def _check_coverage(f: AttributeField, texts: list[str], cfg: AttributesConfig) -> None:
    """Warn about a field that matches few items; AttributeCoverageError when it matches none."""
    present = [t for t in texts if t]
    share = sum(_matches(f, t) for t in present) / max(1, len(present))
    example = (present[0][:120] if present else "(no item has text)")
    if share == 0.0 and not cfg.allow_unmatched:
        raise AttributeCoverageError(
            f"attribute {f.name!r}: pattern {f.pattern!r} matches none of {len(present)} item "
            f"texts, e.g. {example!r} (set allow_unmatched: true to keep it)")
    if share < cfg.min_coverage:
        log.warning("attribute %r matches only %.1f%% of %d item texts (min_coverage %.0f%%), "
                    "e.g. not %r", f.name, 100 * share, len(present), 100 * cfg.min_coverage,
                    next((t[:120] for t in present if not _matches(f, t)), example))


def quantile_bins(f: AttributeField, texts: list[str]) -> list[float]:
    """Strictly increasing bucket edges at the catalogue's (1..Q-1)/Q quantiles of the field."""
    values = np.array([v for t in texts if (v := f.number(t or "")) is not None], dtype=float)
    if len(values) == 0:
        return [0.0]
    edges = np.unique(np.quantile(values, np.arange(1, f.quantiles) / f.quantiles))
    return [float(e) for e in edges] or [float(values[0])]


class ResolvedField(AttributeField):
    """A field with its fitted vocabulary (category/tags); the slot layout is vocab + ["other"]."""

    vocab: list[str] = Field(default_factory=list)
    _slots: dict[str, int] = PrivateAttr(default_factory=dict)

    def model_post_init(self, context: Any) -> None:
        """Label -> slot, built once (serving encodes one text per request)."""
        self._slots = {label: i for i, label in enumerate(self.vocab)}

    @property
    def size(self) -> int:
        """Number of slots of this field."""
        return len(self.bins) + 1 if self.kind == "number" else len(self.vocab) + 1


class AttributesSpec(BaseModel):
    """Fields with fitted vocabularies: the attribute encoder a bundle ships (attributes.json)."""

    model_config = ConfigDict(extra="forbid")
    fields: list[ResolvedField] = Field(min_length=1)

    @classmethod
    def fit(cls, cfg: AttributesConfig, texts: list[str]) -> AttributesSpec:
        """Vocabularies from the catalogue's texts: labels in >= min_count items, sorted."""
        fields = []
        for f in cfg.fields:
            _check_coverage(f, texts, cfg)
            vocab: list[str] = []
            if f.kind != "number":
                counts = Counter(label for t in texts for label in set(f.labels(t) or []))
                vocab = sorted(label for label, n in counts.items() if n >= f.min_count)
            resolved = f.model_dump()
            if f.quantiles is not None:
                resolved |= {"bins": quantile_bins(f, texts), "quantiles": None}
            fields.append(ResolvedField(**resolved, vocab=vocab))
        return cls(fields=fields)

    @property
    def dim(self) -> int:
        """Length of the feature vector."""
        return sum(f.size for f in self.fields)

    def encode(self, texts: list[str]) -> np.ndarray:
        """(N, dim) float32 one-/multi-hot attribute vectors of N texts."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        start = 0
        for f in self.fields:
            if f.kind == "number":
                for row, text in enumerate(texts):
                    value = f.number(text or "")
                    if value is not None:
                        out[row, start + bisect.bisect_right(f.bins, value)] = 1.0
            else:
                other = len(f.vocab)
                for row, text in enumerate(texts):
                    for label in f.labels(text or "") or []:
                        out[row, start + f._slots.get(label, other)] = 1.0
            start += f.size
        return out

    def coverage(self, encoded: np.ndarray) -> dict[str, float]:
        """Share of the rows of `encode`'s output in which each field has a slot set."""
        shares, start = {}, 0
        for f in self.fields:
            has = encoded[:, start:start + f.size].any(1)
            shares[f.name] = float(has.mean()) if len(has) else 0.0
            start += f.size
        return shares


class AttributeHead:
    """The exported attribute encoder: spec + linear head, (dim + 1, d) matrix (weight^T; bias)."""

    def __init__(self, spec: AttributesSpec, matrix: np.ndarray):
        if matrix.ndim != 2 or matrix.shape[0] != spec.dim + 1:
            raise ValueError(f"attribute head matrix has shape {matrix.shape}; expected "
                             f"({spec.dim + 1}, d) for {spec.dim} attribute slots")
        if not np.isfinite(matrix).all():
            raise ValueError("attribute head matrix has non-finite values")
        self.spec, self.matrix = spec, matrix.astype(np.float32, copy=False)

    @property
    def out_dim(self) -> int:
        """Dimension of the vectors it returns (the user space)."""
        return int(self.matrix.shape[1])

    def __call__(self, texts: list[str]) -> np.ndarray:
        """(N, d) vectors in the user space for N texts."""
        return self.spec.encode(texts) @ self.matrix[:-1] + self.matrix[-1]
