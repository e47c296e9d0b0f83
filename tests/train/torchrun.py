"""Launching 2 gloo ranks under torchrun from tests, and killing one of them mid-run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ROOT = Path(__file__).resolve().parents[2]


def children(pid: int) -> list[int]:
    """Direct child processes of pid (Linux /proc)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def kill_one_rank(module_args: list[str], out: Path, log_path: Path, env: dict,
                  start_s: float, finish_s: float) -> str:
    """Run `torchrun --max-restarts 1 -m ...`, SIGKILL rank 1 once `out/checkpoint.pt` exists,
    require the job to finish with status 0 and return its log."""
    with log_path.open("w") as log:
        proc = subprocess.Popen([*TORCHRUN, "--max-restarts", "1", "-m", *module_args], cwd=ROOT,
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + start_s
            while not (out / "checkpoint.pt").is_file():
                assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint written"
                time.sleep(0.05)
            workers = children(proc.pid)
            assert len(workers) == 2
            os.kill(workers[1], signal.SIGKILL)  # one rank dies mid-run
            assert proc.wait(finish_s) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    return log_path.read_text()
