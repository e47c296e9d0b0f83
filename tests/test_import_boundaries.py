"""The serving side never imports torch or the training package (STYLE.md §1, DESIGN.md §2)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVING_PACKAGES = ("index", "serve")
FORBIDDEN = ("torch", "torchvision", "open_clip", "peft", "train")
_FORBIDDEN_LINE = re.compile(
    r"^\s*(import|from)\s+(" + "|".join(FORBIDDEN) + r")(\.|\s|$)", re.MULTILINE)

_PROBE = """
import importlib, json, sys
failed = {}
for name in json.loads(sys.argv[1]):
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as err:
        if not (err.name or "").startswith("serve._gen"):
            failed[name] = repr(err)
    except Exception as err:
        failed[name] = repr(err)
loaded = sorted({m.split(".")[0] for m in sys.modules} & set(json.loads(sys.argv[2])))
print(json.dumps({"failed": failed, "forbidden": loaded}))
"""


def serving_files() -> list[Path]:
    """Python files of the serving packages (absent packages contribute nothing)."""
    files = []
    for package in SERVING_PACKAGES:
        if (ROOT / package).is_dir():
            files += sorted((ROOT / package).rglob("*.py"))
    return files


def module_name(path: Path) -> str:
    """Dotted module name of a file under ROOT."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_serving_modules_do_not_load_torch_or_train():
    modules = [module_name(p) for p in serving_files()]
    assert "index" in modules
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(modules), json.dumps(FORBIDDEN)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["failed"] == {}, f"serving modules failed to import: {report['failed']}"
    assert report["forbidden"] == [], f"serving imports pulled in {report['forbidden']}"


def test_no_forbidden_import_lines():
    offenders = []
    for path in serving_files():
        for match in _FORBIDDEN_LINE.finditer(path.read_text(encoding="utf-8")):
            offenders.append(f"{path.relative_to(ROOT)}: {match.group(0).strip()}")
    assert offenders == []
