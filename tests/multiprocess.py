"""Run a script as two local JAX processes (jax.distributed on localhost, CPU)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_two_processes(script: str, tag: str, timeout: int) -> list:
    """Start `script` as processes 0 and 1 (argv: coordinator address, process id); each must
    print one line "<tag> <json>". Returns the two decoded values; fails with the outputs."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    # Each process sets its own device count; the test session's 8 simulated devices must not leak.
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
               XLA_FLAGS="--xla_backend_optimization_level=0")   # as conftest: fast compiles
    procs = [subprocess.Popen([sys.executable, "-c", script, f"localhost:{port}", str(i)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[-2000:] for o in outs]
    prefix = tag + " "
    return [json.loads(next(l for l in o.splitlines() if l.startswith(prefix))[len(prefix):])
            for o in outs]
