"""Dynamic batching: one inference thread takes the images of the requests that arrive together (up to ``max_batch``
images, waiting at most ``max_wait`` seconds after the first for more) and runs them as one batch, so concurrent
clients share forward passes instead of contending for the cores. It waits only while more requests are on their
way (received, still being read or decoded: ``arriving``), so a lone client pays no wait. ``max_batch=1`` turns it
off: one request at a time, as it came."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator


@dataclass
class _Job:
    images: Any  # a uint8 tensor (N, C, H, W): one request's images
    future: Future = field(default_factory=Future)  # (logits (N, classes), images in the batch it ran in)


class Batcher:
    """Runs ``forward`` (uint8 images -> float logits) on one thread. A request's images are never split between
    batches; one larger than ``max_batch`` runs on its own."""

    def __init__(self, forward: Callable[[Any], Any], max_batch: int, max_wait: float) -> None:
        self.forward, self.max_batch, self.max_wait = forward, max_batch, max_wait
        self._jobs: deque[_Job] = deque()
        self._arriving = 0  # requests received but not submitted yet
        self._closing = False
        self._changed = threading.Condition()  # a job submitted, a request no longer arriving, or closing
        self.batches = self.images = 0
        self._thread = threading.Thread(target=self._loop, name="fcclass-inference", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Around reading and decoding a request, up to its ``submit``: a batch being formed waits for it."""
        with self._changed:
            self._arriving += 1
        try:
            yield
        finally:
            with self._changed:
                self._arriving -= 1
                self._changed.notify()

    def submit(self, images: Any) -> Future:
        """The images' logits, later: a Future of (logits, size of the batch they ran in). Cancelling it before its
        batch starts (a request that timed out) leaves it out of the batch."""
        job = _Job(images)
        with self._changed:
            self._jobs.append(job)
            self._changed.notify()
        return job.future

    def close(self, timeout: float | None = None) -> None:
        """Finish the jobs already submitted, then stop the thread."""
        with self._changed:
            self._closing = True
            self._changed.notify()
        self._thread.join(timeout)

    def _collect(self) -> list[_Job] | None:
        """The next batch: the first job waiting (None: closing and none left), then those that fit, waiting for more
        while requests are arriving, until ``max_wait`` has passed."""
        with self._changed:
            while not self._jobs:
                if self._closing:
                    return None
                self._changed.wait()
            jobs = [self._jobs.popleft()]
            count, deadline = len(jobs[0].images), time.monotonic() + self.max_wait
            while count < self.max_batch:
                if self._jobs:
                    if count + len(self._jobs[0].images) > self.max_batch:
                        break  # it starts the next batch
                    jobs.append(self._jobs.popleft())
                    count += len(jobs[-1].images)
                    continue
                left = deadline - time.monotonic()
                if not self._arriving or left <= 0 or self._closing:
                    break
                self._changed.wait(left)
            return jobs

    def _loop(self) -> None:
        import torch

        while (jobs := self._collect()) is not None:
            live = [job for job in jobs if job.future.set_running_or_notify_cancel()]
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
