"""What the training entry points share (python -m train, train.stage2, train.distill,
export.retrain): `--config` / `--set`, logging, and one way to report a config that does not load.

A config that cannot be read, parsed or validated is exit code 2 with one `FILE: problem` line per
problem on stderr (`FILE:LINE: problem` for YAML syntax, `FILE: a.b: problem` for a field), never a
traceback.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import ValidationError

T = TypeVar("T")
EXIT_CONFIG = 2  # a config or an input file is invalid; nothing ran


def setup_logging() -> None:
    """INFO logs with time, level and logger name on stderr."""
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def parser(prog: str, doc: str | None, config_help: str = "YAML run config",
           config_required: bool = True) -> argparse.ArgumentParser:
    """An argument parser with `--config` and repeatable `--set a.b=c`."""
    p = argparse.ArgumentParser(prog=prog, description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, required=config_required, help=config_help)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="a.b=c",
                   help="override one config key (repeatable)")
    return p


def config_problems(path: Path | None, err: Exception) -> list[str]:
    """`FILE[:LINE]: problem` lines for an exception raised while loading a config."""
    where = str(path) if path is not None else "(defaults)"
    if isinstance(err, ValidationError):
        return [f"{where}: {'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}"
                for e in err.errors()]
    if isinstance(err, yaml.YAMLError):
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        return [f"{where}{line}: invalid YAML: {problem}"]
    if isinstance(err, OSError):
        return [f"{where}: {err.strerror or err}"]
    return [f"{where}: {err}"]


def load_or_report(load: Callable[[Path | None, list[str]], T], path: Path | None,
                   overrides: list[str], what: str = "config") -> T | None:
    """`load(path, overrides)`, or None after printing why the config is invalid to stderr."""
    try:
        return load(path, overrides)
    except (ValidationError, ValueError, OSError, yaml.YAMLError) as err:
        print(f"error: invalid {what}:", file=sys.stderr)
        for line in config_problems(path, err):
            print(f"  {line}", file=sys.stderr)
        return None
