"""Generate the Python gRPC stubs into the git-ignored package `serve/_gen` (idempotent, fast).

    python -m protos.build [--force]

Stubs are produced by grpcio-tools in the target environment at build time, never committed:
grpcio-tools 1.85 emits gencode that refuses older protobuf runtimes (SERVING.md §1.3). The
generated `*_pb2_grpc.py` imports its messages as `from ptmrec.v1 import ...`, which would need
`serve/_gen` on sys.path; the import is rewritten to a relative one so that
`from serve._gen.ptmrec.v1 import recommender_pb2, recommender_pb2_grpc` works as is. A stamp
file keyed on the .proto contents and the grpcio-tools version makes a repeated run a no-op.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.resources
import logging
import re
import shutil
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
OUT = REPO / "serve" / "_gen"
STAMP = ".stamp"
_ABSOLUTE_IMPORT = re.compile(r"^from ((?:\w+\.)*\w+) import (\w+_pb2) as ", re.MULTILINE)


def proto_files() -> list[Path]:
    """All .proto files under protos/, sorted."""
    return sorted(ROOT.rglob("*.proto"))


def fingerprint(files: list[Path]) -> str:
    """Hash of the proto sources and the generator version."""
    h = hashlib.sha256(importlib.metadata.version("grpcio-tools").encode())
    for path in files:
        h.update(path.relative_to(ROOT).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def up_to_date(out: Path = OUT) -> bool:
    """Whether `out` holds stubs generated from the current protos."""
    stamp = out / STAMP
    return stamp.is_file() and stamp.read_text(encoding="utf-8").strip() == fingerprint(
        proto_files())


def _relative_imports(path: Path, package: str) -> None:
    """Rewrite `from ptmrec.v1 import x_pb2 as` into `from . import x_pb2 as` in one stub file."""
    text = path.read_text(encoding="utf-8")

    def fix(match: re.Match) -> str:
        return f"from . import {match.group(2)} as " if match.group(1) == package else match.group(0)

    path.write_text(_ABSOLUTE_IMPORT.sub(fix, text), encoding="utf-8")


def _run_protoc(files: list[Path], out: Path) -> None:
    """Invoke grpc_tools.protoc in-process; RuntimeError on failure."""
    from grpc_tools import protoc

    well_known = importlib.resources.files("grpc_tools") / "_proto"
    args = ["grpc_tools.protoc", f"-I{ROOT}", f"-I{well_known}", f"--python_out={out}",
            f"--pyi_out={out}", f"--grpc_python_out={out}", *map(str, files)]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {[f.name for f in files]}")


def _finish_package(tmp: Path, files: list[Path]) -> None:
    """Add __init__.py files and make the stubs' cross imports relative."""
    (tmp / "__init__.py").write_text('"""Generated gRPC stubs (python -m protos.build)."""\n')
    for directory in sorted({p for p in tmp.rglob("*") if p.is_dir()}):
        init = directory / "__init__.py"
        if not init.exists():
            init.write_text("")
    for proto in files:
        rel = proto.relative_to(ROOT)
        package = ".".join(rel.parent.parts)
        for stub in (tmp / rel.parent).glob(f"{proto.stem}_pb2*.py"):
            _relative_imports(stub, package)


def _replace_dir(new: Path, out: Path) -> None:
    """Move `new` to `out`, replacing an older `out` (two renames; readers see old or new)."""
    old = out.with_name(f".{out.name}.old-{new.name}")
    if out.exists():
        out.rename(old)
    new.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def build(force: bool = False, out: Path = OUT) -> bool:
    """Generate the stubs unless up to date; returns whether anything was written."""
    files = proto_files()
    if not force and up_to_date(out):
        return False
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="._gen-", dir=out.parent))
    try:
        _run_protoc(files, tmp)
        _finish_package(tmp, files)
        (tmp / STAMP).write_text(fingerprint(files) + "\n", encoding="utf-8")
        _replace_dir(tmp, out)
    except OSError:
        if up_to_date(out):  # a concurrent run (another test session) got there first
            return False
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("generated stubs for %d proto file(s) into %s", len(files), out)
    return True


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description="Generate gRPC stubs into serve/_gen.")
    parser.add_argument("--force", action="store_true", help="regenerate even if up to date")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    wrote = build(force=args.force)
    print(f"stubs {'generated' if wrote else 'up to date'} in {OUT.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
