"""What the `fcclass serve` tests share: real Fashion-MNIST PNGs, the bad uploads a server must refuse (with the status
and words its answer must have), and a real `fcclass serve` process on a free port."""

from __future__ import annotations

import os
import re
import signal
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from conftest import ROOT

SAMPLES = sorted((ROOT / "samples").glob("test_*.png"))  # Fashion-MNIST test images 0-2, as PNG files


def png_bomb(side: int = 10_000) -> bytes:
    """A tiny PNG that declares side x side pixels: over the decompression-bomb limit."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 10)) + chunk(b"IEND", b"")


def bad_files() -> dict[str, tuple[bytes, int, str]]:
    """name -> (bytes, the status the server answers, a piece of the error it gives)."""
    return {
        "notes.png": (b"just some text, not an image", 415, "not an image"),
        "empty.png": (b"", 415, "empty file"),
        "truncated.png": (SAMPLES[0].read_bytes()[:80], 422, "truncated"),
        "bomb.png": (png_bomb(), 422, "decompression bomb"),
    }


@dataclass
class ServeProcess:
    """`fcclass serve` in a process of its own, on a free port (--port 0), started and waited for until ready."""

    proc: subprocess.Popen
    url: str
    lines: list[str]

    @classmethod
    def start(cls, *args: str, env: dict[str, str] | None = None, timeout: float = 90, cwd: Path = ROOT) -> ServeProcess:
        proc = subprocess.Popen([sys.executable, "-m", "fcclass", "serve", "--port", "0", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env={**os.environ, "COLUMNS": "300", **(env or {})},
                                cwd=cwd)
        lines: list[str] = []
        deadline = time.monotonic() + timeout
        url = None
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip("\n"))
            found = re.search(r"listening on (http://\S+)", line)
            url = found.group(1) if found else url
            if line.startswith("Ready"):
                return cls(proc, url or "", lines)
        proc.kill()
        raise AssertionError("fcclass serve did not get ready:\n" + "\n".join(lines) + (proc.stdout.read() or ""))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> tuple[int, str]:
        """Send ``sig``; the exit status and the rest of the output."""
        self.proc.send_signal(sig)
        out, _ = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out
