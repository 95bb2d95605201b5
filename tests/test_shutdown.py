"""Clean shutdown: a process that opens the embedded handle, uses every part of it (ingest, ranking on
ONNX Runtime, an analytics query, background jobs) and closes it exits 0 with nothing on stderr from a
native thread (`terminate called without an active exception` was seen at exit), and leaves no process
or temporary file behind, also when the close meets an ONNX export in progress."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from insession.features import default_registry
from insession.model import DualSequenceReranker, Vocab
from insession.model.artefact import save_artefact

CHILD = Path(__file__).with_name("shutdown_child.py")
RUNS = ("serving", "serving", "exporting")  # the first run also exports v1 to ONNX (~10 s of the ~16 s idle)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """A data directory whose model (v1, a seeded tiny reranker) knows the child's catalogue."""
    ids = [f"i{n}" for n in range(32)]
    vocab = Vocab.build(pa.array(ids), pa.array([f"c{n % 4}" for n in range(32)]),
                        pa.array([f"s{n % 8}" for n in range(32)]))
    torch.manual_seed(0)
    cfg = vocab.config(dim=16, n_heads=2, n_layers=1, dropout=0.0, max_history=20, max_session=10)
    save_artefact(tmp_path / "data" / "models" / "v1", DualSequenceReranker(cfg).eval(), vocab,
                  default_registry().hash(), {})
    return tmp_path / "data"


def _processes_naming(text: str) -> list[str]:
    """Command lines of live processes that mention `text`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:  # it ended meanwhile
            continue
        if any(text in a for a in args):
            found.append(" ".join(args))
    return found


def test_the_process_exits_0_after_close_and_leaves_nothing_running(data: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for run, mode in enumerate(RUNS):
        done = subprocess.run([sys.executable, str(CHILD), str(data), mode], capture_output=True, text=True,
                              env=env, timeout=300)
        assert "terminate called" not in done.stderr, f"run {run} ({mode}): {done.stderr[-3000:]}"
        assert done.returncode == 0, f"run {run} ({mode}) exited {done.returncode}: {done.stderr[-3000:]}"
        assert done.stdout.startswith("closed "), done.stdout
        assert float(done.stdout.split()[1]) < 10.0  # a close stops the export, it does not wait it out
        assert not _processes_naming(str(data)), f"run {run} ({mode}) left a process behind"
    leftovers = [p.name for p in (data / "models").rglob("*") if p.name.startswith(".") or ".tmp" in p.name]
    assert not leftovers  # no temporary file of an export, finished or stopped
    assert sorted(p.name for p in (data / "models" / "v1").iterdir() if "onnx" in p.name) == ["serve.onnx"]
    assert not (data / "models" / "v2" / "serve.onnx").exists()  # its export was stopped by the close
