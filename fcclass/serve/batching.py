"""Dynamic batching: one inference thread takes the images of the requests that arrive together (up to ``max_batch``
images, waiting at most ``max_wait`` seconds after the first for more) and runs them as one batch, so concurrent
clients share forward passes instead of contending for the cores. It waits only while more requests are on their
way (received, still being read or decoded: ``arriving``), so a lone client pays no wait. ``max_batch=1`` turns it
off: one request at a time, as it came."""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

POLL = 0.0005  # seconds: how often a waiting batch looks again whether requests are still on their way


@dataclass
class _Job:
    images: Any  # a uint8 tensor (N, C, H, W): one request's images
    future: Future = field(default_factory=Future)  # (logits (N, classes), images in the batch it ran in)


class Batcher:
    """Runs ``forward`` (uint8 images -> float logits) on one thread. A request's images are never split between
    batches; one larger than ``max_batch`` runs on its own."""

    def __init__(self, forward: Callable[[Any], Any], max_batch: int, max_wait: float) -> None:
        self.forward, self.max_batch, self.max_wait = forward, max_batch, max_wait
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._held: _Job | None = None  # taken from the queue but did not fit the last batch
        self._stopping = False
        self._arriving = 0  # requests received but not submitted yet
        self._lock = threading.Lock()
        self.batches = self.images = 0
        self._thread = threading.Thread(target=self._loop, name="fcclass-inference", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Around reading and decoding a request, up to its ``submit``: a batch being formed waits for it."""
        with self._lock:
            self._arriving += 1
        try:
            yield
        finally:
            with self._lock:
                self._arriving -= 1

    def submit(self, images: Any) -> Future:
        """The images' logits, later: a Future of (logits, size of the batch they ran in). Cancelling it before its
        batch starts (a request that timed out) leaves it out of the batch."""
        job = _Job(images)
        self._queue.put(job)
        return job.future

    def close(self, timeout: float | None = None) -> None:
        """Finish the jobs already submitted, then stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _collect(self) -> list[_Job]:
        first = self._held if self._held is not None else self._queue.get()
        self._held = None
        if first is None:
            self._stopping = True
            return []
        jobs, count = [first], len(first.images)
        deadline = time.monotonic() + self.max_wait
        while count < self.max_batch and not self._stopping:
            left = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=min(left, POLL)) if self._arriving and left > 0 else self._queue.get_nowait()
            except queue.Empty:
                if self._arriving and left > 0:
                    continue
                break
            if job is None:
                self._stopping = True
            elif count + len(job.images) > self.max_batch:
                self._held = job
                break
            else:
                jobs.append(job)
                count += len(job.images)
        return jobs

    def _loop(self) -> None:
        import torch

        while not (self._stopping and self._held is None):
            live = [job for job in self._collect() if job.future.set_running_or_notify_cancel()]
            if not live:
                continue
            try:
                logits = self.forward(torch.cat([job.images for job in live]))
            except BaseException as e:  # a bug, not the input's fault: every request of the batch is told, the thread goes on
                for job in live:
                    job.future.set_exception(e)
                continue
            size = sum(len(job.images) for job in live)
            self.batches, self.images = self.batches + 1, self.images + size
            start = 0
            for job in live:
                job.future.set_result((logits[start : start + len(job.images)], size))
                start += len(job.images)
