"""Attribute fields that (almost) never match are reported; number bins can come from quantiles."""
from __future__ import annotations

import logging

import pytest
from pydantic import ValidationError

from index.attributes import AttributeCoverageError, AttributesConfig, AttributesSpec

TEXTS = [f"Film {i} ({1990 + i % 10}). Genres: Drama." for i in range(40)] + ["Brand: X."] * 2


def _cfg(**field):
    return AttributesConfig.model_validate({"fields": [{"name": "f", **field}]})


def test_a_field_matching_no_item_is_an_error_naming_it_unless_allowed():
    cfg = _cfg(pattern=r"Year: (\d+)", kind="number", bins=[2000])
    with pytest.raises(AttributeCoverageError, match=r"attribute 'f'.*matches none of 42.*Film 0"):
        AttributesSpec.fit(cfg, TEXTS)
    allowed = cfg.model_copy(update={"allow_unmatched": True})
    assert AttributesSpec.fit(allowed, TEXTS).fields[0].name == "f"


def test_a_rare_field_is_a_warning_with_an_example(caplog):
    cfg = _cfg(pattern=r"Brand: (\w+)", kind="category")
    with caplog.at_level(logging.WARNING, logger="index.attributes"):
        spec = AttributesSpec.fit(cfg, TEXTS)
    assert spec.fields[0].vocab == ["X"]
    assert "attribute 'f' matches only 4.8% of 42 item texts" in caplog.text
    assert "Film 0 (1990)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="index.attributes"):
        AttributesSpec.fit(_cfg(pattern=r"Genres: (\w+)", kind="category"), TEXTS)
    assert caplog.text == ""


def test_quantile_bins_follow_the_catalogue():
    spec = AttributesSpec.fit(_cfg(pattern=r"\((\d{4})\)", kind="number", quantiles=4), TEXTS)
    field = spec.fields[0]
    assert field.bins == [1992.0, 1994.5, 1997.0] and field.quantiles is None
    encoded = spec.encode(["Old (1990)", "New (2024)"])
    assert encoded[0].argmax() == 0 and encoded[1].argmax() == 3   # a later year: the top bucket
    # the resolved spec (what a bundle ships) round-trips with its fitted edges
    assert AttributesSpec.model_validate_json(spec.model_dump_json()).fields[0].bins == field.bins


def test_bins_and_quantiles_are_exclusive_and_number_only():
    with pytest.raises(ValidationError, match="bins or quantiles, not both"):
        _cfg(pattern=r"(\d+)", kind="number", bins=[1], quantiles=3)
    with pytest.raises(ValidationError, match="needs bins"):
        _cfg(pattern=r"(\d+)", kind="number")
    with pytest.raises(ValidationError, match="apply to kind number only"):
        _cfg(pattern=r"(\w+)", kind="tags", quantiles=3)
