"""Shared benchmark helpers: percentiles, markdown tables, machine description."""

from __future__ import annotations

import asyncio
import os
import platform
import re
import subprocess
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm


def percentiles_ms(samples_s: Sequence[float]) -> dict[str, float]:
    """p50/p99/p99.9 and mean of latencies given in seconds, returned in milliseconds."""
    a = np.asarray(samples_s, dtype=np.float64) * 1000.0
    return {
        "p50": float(np.percentile(a, 50)),
        "p99": float(np.percentile(a, 99)),
        "p99.9": float(np.percentile(a, 99.9)),
        "mean": float(a.mean()),
        "n": int(a.size),
    }


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table; floats get 3 significant decimals."""

    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.0f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def machine() -> str:
    """One line naming the machine, for the header of docs/benchmarks.md."""
    cpu = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem_gib:.0f} GiB, Python {platform.python_version()}, {platform.system()}"


def stamp() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def latency_histogram(name: str, title: str, series: dict[str, Sequence[float]]) -> str:
    """Plot latency histograms (samples in seconds, log-scaled ms axis) with their p50/p99 marked to
    docs/img/<name>.png; returns the markdown that shows it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = Path(__file__).resolve().parent.parent / "docs" / "img"
    img.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 4))
    every = np.concatenate([np.asarray(s, dtype=np.float64) * 1000.0 for s in series.values()])
    every = every[every > 0]
    bins = np.geomspace(max(every.min(), 1e-3), every.max() * 1.01, 80)
    for (label, samples), color in zip(series.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"],
                                       strict=False):
        ms = np.asarray(samples, dtype=np.float64) * 1000.0
        p50, p99 = np.percentile(ms, [50, 99])
        ax.hist(ms, bins=bins, alpha=0.55, color=color, label=f"{label} (p50 {p50:.2f}, p99 {p99:.2f} ms)")
        ax.axvline(p99, color=color, linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("latency, ms (log scale; dashed: p99)")
    ax.set_ylabel("requests")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(img / f"{name}.png", dpi=110)
    plt.close(fig)
    return f"![{title}](img/{name}.png)"


CONNECTIONS = 16  # a load client's keep-alive connections: a slow answer never delays the next send


class Sample(NamedTuple):
    """One open-loop request: when it was due (s after the start), its latency from then (s), its status."""

    due: float
    latency: float
    status: int


def http_request(method: str, path: str, body: bytes = b"", content_type: str = "application/json") -> bytes:
    """The bytes of one keep-alive HTTP/1.1 request to the loopback server."""
    head = b"%b %b HTTP/1.1\r\nHost: 127.0.0.1\r\n" % (method.encode(), path.encode())
    if method == "GET":
        return head + b"\r\n"
    return head + b"Content-Type: %b\r\nContent-Length: %d\r\n\r\n%b" % (content_type.encode(), len(body), body)


async def open_loop(port: int, request: Callable[[int], bytes], rate: float, seconds: float, label: str,
                    answers: list[bytes] | None = None) -> tuple[list[Sample], int]:
    """Open-loop load on 127.0.0.1:port: request i (`request(i)`, raw HTTP bytes) is due at start + i / rate
    and sent on a free keep-alive connection, whatever earlier answers do; its latency counts from when it
    was due. A bare HTTP/1.1 client on asyncio streams, so the client's own cost stays small next to the
    server's. Returns (samples in order of completion, sends more than 1 ms late); `answers` gets the bodies."""
    pool: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
    for _ in range(CONNECTIONS):
        pool.put_nowait(await asyncio.open_connection("127.0.0.1", port))
    samples: list[Sample] = []
    late = 0
    start = time.perf_counter()

    async def one(i: int, due: float) -> None:
        reader, writer = await pool.get()
        try:
            writer.write(request(i))
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?i)content-length:\s*(\d+)", head)
            body = await reader.readexactly(int(length.group(1)) if length else 0)
            samples.append(Sample(due - start, time.perf_counter() - due, int(head[9:12])))
            if answers is not None:
                answers.append(body)
        finally:
            pool.put_nowait((reader, writer))

    tasks = []
    for i in tqdm(range(int(rate * seconds)), desc=f"{label} at {rate:.0f}/s", leave=False):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -0.001:
            late += 1
        tasks.append(asyncio.create_task(one(i, due)))
    await asyncio.gather(*tasks)
    while not pool.empty():
        pool.get_nowait()[1].close()
    return samples, late


async def paced(port: int, path: str, bodies: list[bytes], rate: float, seconds: float,
                answers: list[bytes] | None = None) -> tuple[list[float], int, int, float]:
    """`open_loop` of POSTs of `bodies` (body i mod len) to `path`. Returns (latencies, non-200 answers,
    sends more than 1 ms late, elapsed)."""
    requests = [http_request("POST", path, b) for b in bodies]
    start = time.perf_counter()
    samples, late = await open_loop(port, lambda i: requests[i % len(requests)], rate, seconds, f"POST {path}",
                                    answers)
    elapsed = time.perf_counter() - start
    return [s.latency for s in samples], sum(s.status != 200 for s in samples), late, elapsed
