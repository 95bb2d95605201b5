"""ONNX Runtime scoring: the reranker's encode-once-and-score pass exported once per artefact, run by ORT.

The graph is exactly `model.encode` then `model.score(..., explain=True)` for one request: history and
session are encoded once inside it and the C candidates scored in one batched pass (C, and both sequence
lengths, are dynamic axes). ORT runs it with far less per-operator overhead than eager PyTorch, which
dominates at this size (see docs/benchmarks.md). The export (torch.export -> ONNX, some seconds) is cached
as `serve.onnx` in the artefact's directory, so a model is exported once, at its first load.

The server exports in a child process (`python -m insession.rank.onnx ARTEFACT_DIR`): torch.export patches
`nn.Module.__call__` for the whole process while it traces, so an eager forward in another thread (a
request served while a new model exports, a reload's warm-up) was traced into the graph and failed with
"Unexpected key ...". The child also keeps the export's seconds of Python off the server's GIL.
A ranker that closes meanwhile stops the child (`stop`) and removes its temporary file, so no exporter
outlives the server and nothing half-written stays in the artefact's directory. The graph and its
weights are one file (no external data file: the exporter named that after the temporary file).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from insession.model import DualSequenceReranker, Explanation
from insession.model import Sequence as SeqTensors
from insession.model.reranker import QUERY_BUCKETS, SIGNALS
from insession.model.vocab import QUERY_GRAMS

log = logging.getLogger(__name__)

ONNX_FILE = "serve.onnx"
EXPORT_TIMEOUT_S = 900.0
STOP_POLL_S = 0.1  # how often a waiting export looks at its stop event
_INPUTS = (
    "h_items", "h_actions", "h_ts", "s_items", "s_actions", "s_ts", "request_ts", "surface", "queries",
    "candidates", "counters", "signals",
)


class _EncodeAndScore(nn.Module):
    def __init__(self, model: DualSequenceReranker) -> None:
        super().__init__()
        self.model = model

    def forward(self, hi: Tensor, ha: Tensor, ht: Tensor, si: Tensor, sa: Tensor, st: Tensor, now: Tensor,
                surface: Tensor, queries: Tensor, cands: Tensor, counters: Tensor,
                signals: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        enc = self.model.encode(SeqTensors(hi, ha, ht), SeqTensors(si, sa, st), now, surface, queries)
        scores, why = self.model.score(enc, cands, counters, explain=True, signals=signals)  # type: ignore[misc]
        return scores, why.history_attention, why.session_attention, why.gate


class ExportStopped(RuntimeError):
    """The export was stopped before it ended (the ranker is closing); nothing of it is left on disk."""


def _temporary(path: Path, pid: int) -> Path:
    """Where process `pid` writes the export of `path` before renaming it into place."""
    return path.with_name(f".{path.stem}.{pid}.tmp.onnx")


def export(model: DualSequenceReranker, path: Path) -> None:
    """Write the serving graph of `model` (eval mode) to `path` atomically, as one file."""
    g = torch.Generator().manual_seed(0)
    n = model.cfg.n_items

    def side(length: int) -> list[Tensor]:
        return [torch.randint(1, n, (1, length), generator=g), torch.randint(1, 5, (1, length), generator=g),
                torch.arange(length).view(1, -1) * 60_000 + 1_700_000_000_000]

    cands = torch.randint(1, n, (1, 7), generator=g)
    queries = torch.randint(0, QUERY_BUCKETS, (1, 2, QUERY_GRAMS), generator=g)
    example = (*side(5), *side(3), torch.tensor([1_700_000_600_000]), torch.tensor([1]), queries, cands,
               torch.rand(1, 7, 3, generator=g), torch.rand(1, 7, len(SIGNALS), generator=g))
    lh, ls, q, c = (torch.export.Dim(name, min=1, max=4096) for name in ("history", "session", "queries", "candidates"))
    dims = ({1: lh}, {1: lh}, {1: lh}, {1: ls}, {1: ls}, {1: ls}, None, None, {1: q}, {1: c}, {1: c}, {1: c})
    tmp = _temporary(path, os.getpid())
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    try:
        exporter_log.setLevel(logging.ERROR)  # the exporter's notes (optional torchvision ops, axis names)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(_EncodeAndScore(model).eval(), example, tmp, dynamo=True, dynamic_shapes=dims,
                              input_names=list(_INPUTS), output_names=["scores", "wh", "ws", "gate"],
                              optimize=True, verbose=False, external_data=False)
        os.replace(tmp, path)
    finally:
        exporter_log.setLevel(level)
        if os.path.exists(tmp):
            os.unlink(tmp)


class OnnxScorer:
    """`scorer(history, session, request_ts, surface, queries, candidates, counters, signals)` -> (scores [C],
    Explanation) via ORT."""

    def __init__(self, artefact_dir: Path, threads: int = 1, stop: threading.Event | None = None) -> None:
        import onnxruntime as ort

        path = artefact_dir / ONNX_FILE
        weights = next(artefact_dir.glob("*.pt"), None)
        if not path.exists() or (weights is not None and path.stat().st_mtime < weights.stat().st_mtime):
            log.info("exporting %s to ONNX in a child process (once per artefact)", artefact_dir)
            _export_in_child(artefact_dir, stop or threading.Event())
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def __call__(self, history: SeqTensors, session: SeqTensors, request_ts: Tensor, surface: Tensor,
                 queries: Tensor, candidates: Tensor, counters: Tensor,
                 signals: Tensor) -> tuple[np.ndarray, Explanation]:
        values = (history.items, history.actions, history.ts, session.items, session.actions, session.ts,
                  request_ts, surface, queries, candidates.view(1, -1), counters.view(1, -1, counters.shape[-1]),
                  signals.view(1, -1, signals.shape[-1]))
        feed = dict(zip(_INPUTS, values, strict=True))
        scores, wh, ws, gate = self.session.run(None, {k: v.numpy() for k, v in feed.items()})
        why = Explanation(torch.from_numpy(wh), torch.from_numpy(ws), torch.from_numpy(gate))
        return scores[0], why


def _export_in_child(artefact_dir: Path, stop: threading.Event) -> None:
    """`python -m insession.rank.onnx ARTEFACT_DIR`, waited for; killed (its temporary file removed) when
    `stop` is set (ExportStopped) or past EXPORT_TIMEOUT_S (RuntimeError)."""
    proc = subprocess.Popen([sys.executable, "-m", "insession.rank.onnx", str(artefact_dir)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + EXPORT_TIMEOUT_S
    try:
        while True:
            try:
                _, err = proc.communicate(timeout=STOP_POLL_S)
                break
            except subprocess.TimeoutExpired:
                if stop.is_set():
                    raise ExportStopped(f"the ONNX export of {artefact_dir.name} was stopped") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the ONNX export of {artefact_dir.name} ran past {EXPORT_TIMEOUT_S:g}s") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        if proc.returncode != 0:  # a stopped, killed or failed child leaves no temporary file behind
            _temporary(artefact_dir / ONNX_FILE, proc.pid).unlink(missing_ok=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the ONNX export of {artefact_dir.name} failed: {err.strip()[-2000:]}")


def main(argv: list[str]) -> None:
    """`python -m insession.rank.onnx ARTEFACT_DIR`: export the artefact's serving graph to its serve.onnx."""
    from insession.model.artefact import load_artefact

    artefact_dir = Path(argv[1])
    export(load_artefact(artefact_dir).model, artefact_dir / ONNX_FILE)


if __name__ == "__main__":
    main(sys.argv)
