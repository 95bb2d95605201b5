"""A child process the server keeps running: the snapshot standby and the feature reader both use it.

The contract (`ChildProcess.check`, called by its owner every second or so):
- exit `EXIT_RESTART`: the child asked to be started again later (its declarations changed, or one is still
  backfilling): it is, after `restart_after_s`, and that is no failure;
- any other exit is a failure: counted, logged, and the child is started again after 2, 4, 8 ... s, at
  most `RETRY_MAX_S`;
- the backoff starts again only once the child has run `RETRY_MAX_S` without failing. Before, the standby
  reset it whenever it saw its child running, so a child that failed a second after each start was
  started again every 2 s for ever; the reader had the rule above; now both have it.

`stop` sends SIGTERM and kills the child after a timeout. The owner says what the child is (`command`,
and `stdin`: a config that must not appear on a command line, which every user of the host can read).
"""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Sequence

log = logging.getLogger(__name__)

EXIT_RESTART = 3  # the child's declarations changed, or one is still backfilling: start it again later
RETRY_MAX_S = 60.0  # a failing background job (child, export, snapshot) retries after 2, 4 ... s, at most this


class ChildProcess:
    """One supervised child: `check` (notice an exit, restart when due), `running`, `stop`; `starts` and
    `failures` count for /metrics and /readyz."""

    def __init__(self, name: str, command: Sequence[str], *, restart_after_s: float, stdin: bytes | None = None,
                 consequence: str = "") -> None:
        self.name = name
        self.command = list(command)
        self.stdin = stdin
        self.restart_after_s = restart_after_s
        self.consequence = consequence  # what the owner does while the child is down, for the log line
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.failures = 0
        self._streak = 0  # failed exits since the child last ran RETRY_MAX_S: the backoff doubles with each
        self._start_at = 0.0  # when to start it next (monotonic)
        self._started_at = 0.0

    def start(self, now: float | None = None) -> None:
        """Start the child (a fresh interpreter, never a fork of the server)."""
        self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL if self.stdin is None else subprocess.PIPE)
        if self.stdin is not None:
            assert self.proc.stdin is not None
            self.proc.stdin.write(self.stdin)
            self.proc.stdin.close()
        self.starts += 1
        self._started_at = time.monotonic() if now is None else now

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check(self, now: float | None = None) -> bool:
        """Notice an exit and start the child when its restart is due (see the module docstring); `now`:
        monotonic seconds (a test's clock). Returns whether the child is running after the call."""
        now = time.monotonic() if now is None else now
        if self.proc is not None and (code := self.proc.poll()) is not None:
            self.proc = None
            if code == EXIT_RESTART:
                self._start_at = now + self.restart_after_s
            else:
                self.failures += 1
                self._streak = 1 if now - self._started_at >= RETRY_MAX_S else self._streak + 1
                self._start_at = now + min(RETRY_MAX_S, 2.0**self._streak)
                log.warning("the %s exited with code %d (%d failures so far); starting it again in %.0f s%s",
                            self.name, code, self.failures, self._start_at - now, self.consequence)
        if self.proc is None and now >= self._start_at:
            self.start(now)
        return self.running()

    def stop(self, timeout_s: float) -> None:
        """Ask the child to stop with SIGTERM; SIGKILL it after `timeout_s`. Nothing to do for one never
        started or already gone."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
