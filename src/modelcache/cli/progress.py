"""Progress rendering: the engine emits events; a TTY gets a rich bar, anything else periodic log lines."""

from __future__ import annotations

import logging
import sys
import time
from types import TracebackType

from modelcache.quantity import format_bytes
from modelcache.transfer import ProgressEvent

log = logging.getLogger("modelcache")


class PlainProgress:
    """One log line every `interval` seconds: readable in `kubectl logs` and CI output."""

    def __init__(self, label: str, interval: float = 5.0) -> None:
        self.label = label
        self.interval = interval
        self.done = 0
        self.total = 0
        self.start = time.monotonic()
        self.last = 0.0

    def __call__(self, e: ProgressEvent) -> None:
        if e.kind == "plan":
            self.done, self.total = e.nbytes, e.total
            resumed = f", resuming at {format_bytes(e.nbytes)}" if e.nbytes else ""
            log.info("downloading %s: %s, %s%s", self.label, e.message, format_bytes(e.total), resumed)
            self.last = time.monotonic()
        elif e.kind == "advance":
            self.done += e.nbytes
            now = time.monotonic()
            if now - self.last >= self.interval:
                self.last = now
                pct = 100 * self.done / self.total if self.total else 0
                rate = self.done / max(1e-9, now - self.start)
                log.info(
                    "progress %s: %s / %s (%.0f%%) %s/s",
                    self.label,
                    format_bytes(self.done),
                    format_bytes(self.total),
                    pct,
                    format_bytes(rate),
                )
        elif e.kind in ("retry", "wait"):
            log.warning("%s: %s", self.label, e.message)

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None


class RichProgress:
    """A live bar on stderr with bytes, speed and ETA."""

    def __init__(self, label: str) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.task = self.progress.add_task(label, total=None)

    def __call__(self, e: ProgressEvent) -> None:
        if e.kind == "plan":
            self.progress.update(self.task, total=e.total, completed=e.nbytes)
        elif e.kind == "advance":
            self.progress.advance(self.task, e.nbytes)
        elif e.kind in ("retry", "wait"):
            self.console.print(f"[yellow]{e.message}")

    def __enter__(self) -> RichProgress:
        self.progress.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.progress.stop()


def make_progress(label: str, *, quiet: bool) -> PlainProgress | RichProgress | None:
    if quiet:
        return None
    if sys.stderr.isatty():
        return RichProgress(label)
    return PlainProgress(label)
