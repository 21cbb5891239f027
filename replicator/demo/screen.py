"""The demo's terminal: narration above a live block redrawn in place, or periodic plain lines
when stdout is not a terminal."""

from __future__ import annotations

import contextlib
import os
import shutil
import textwrap
import time
from typing import TextIO

__all__ = ["REFRESH", "Screen"]

REFRESH = 0.5  # seconds between redraws of the live view


class Screen:
    def __init__(self, out: TextIO, plain_every: float) -> None:
        self.out = out
        self.live = out.isatty() and os.environ.get("TERM", "") != "dumb"
        self.plain_every = plain_every
        self.width = shutil.get_terminal_size((100, 24)).columns - 1
        self.drawn = 0
        self.block: list[str] = []
        self.printed_at = -1e9

    def say(self, text: str = "") -> None:
        """A line as given: printed above the live view, which is redrawn below it."""
        self._erase()
        self._write(text + "\n")
        self._draw()

    def tell(self, text: str, indent: int = 0) -> None:
        """Narration: one paragraph, wrapped to the terminal."""
        pad = " " * indent
        width = max(40, min(self.width, 96))
        wrapped = textwrap.fill(
            text, width, initial_indent=pad, subsequent_indent=pad, break_on_hyphens=False
        )
        self.say(wrapped)

    def show(self, lines: list[str], *, final: bool = False) -> None:
        self.block = lines
        if self.live:
            self._erase()
            self._draw()
        elif time.monotonic() - self.printed_at >= (REFRESH * 2 if final else self.plain_every):
            self.printed_at = time.monotonic()
            self._write("".join(f"  | {line}\n" for line in lines))

    def close(self) -> None:
        """Leave the last view on screen, the cursor below it, and stop redrawing it."""
        self.drawn = 0
        self.block = []

    def _erase(self) -> None:
        if self.drawn:
            self._write(f"\x1b[{self.drawn}F\x1b[J")
            self.drawn = 0

    def _draw(self) -> None:
        if self.live and self.block:
            self._write("".join(line[: self.width] + "\n" for line in self.block))
            self.drawn = len(self.block)

    def _write(self, text: str) -> None:
        with contextlib.suppress(BrokenPipeError):
            self.out.write(text)
            self.out.flush()
