"""One worker thread runs heavy jobs (training, captioning, grids, previews) one at a time, in submission order."""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("studio.jobs")

QUEUED, RUNNING, DONE, FAILED, STOPPED, CANCELLED = "queued", "running", "done", "failed", "stopped", "cancelled"
FINAL = (DONE, FAILED, STOPPED, CANCELLED)


@dataclass
class Job:
    """A unit of heavy work: `fn(job)` runs in the worker; it may read `job.stop` and call `job.report(text)`."""

    id: int
    kind: str
    label: str
    fn: Callable[[Job], Any]
    run_dir: str | None = None
    state: str = QUEUED
    message: str = ""
    result: Any = None
    error: str | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    done_event: threading.Event = field(default_factory=threading.Event)
    info: dict[str, Any] = field(default_factory=dict)  # progress the job reports (steps, totals, times)

    @property
    def finished(self) -> bool:
        return self.state in FINAL

    def report(self, message: str) -> None:
        self.message = message


def readable_error(error: BaseException) -> str:
    """A message for the UI: ValueError and engine errors as they are, anything else prefixed with its class name."""
    text = str(error).strip() or type(error).__name__
    if isinstance(error, ValueError) or type(error).__module__.startswith("engine"):
        return text  # the engine's own errors name the bad input already
    return f"{type(error).__name__}: {text}"


class JobQueue:
    """FIFO of jobs with one worker thread; everyone sees their position (0 = running now)."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Job] = queue.Queue()
        self._jobs: dict[int, Job] = {}
        self._order: list[int] = []
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name="studio-worker", daemon=True)
        self._thread.start()

    def submit(self, kind: str, label: str, fn: Callable[[Job], Any], run_dir: str | None = None) -> Job:
        with self._lock:
            job = Job(next(self._ids), kind, label, fn, run_dir)
            self._jobs[job.id] = job
            self._order.append(job.id)
        self._queue.put(job)
        return job

    def get(self, job_id: int) -> Job | None:
        return self._jobs.get(job_id)

    def jobs(self) -> list[Job]:
        with self._lock:
            return [self._jobs[i] for i in self._order]

    def position(self, job: Job) -> int | None:
        """0 while running, n for the n-th job waiting, None when finished."""
        if job.state == RUNNING:
            return 0
        if job.state != QUEUED:
            return None
        waiting = [j for j in self.jobs() if j.state == QUEUED]
        return next((i + 1 for i, j in enumerate(waiting) if j.id == job.id), None)

    def cancel(self, job: Job) -> None:
        """Stop a running job (it checks job.stop) or drop a queued one."""
        job.stop.set()
        if job.state == QUEUED:
            job.state, job.ended = CANCELLED, time.time()
            job.done_event.set()

    def running(self) -> Job | None:
        return next((j for j in self.jobs() if j.state == RUNNING), None)

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job.state != QUEUED:
                continue
            job.state, job.started = RUNNING, time.time()
            try:
                job.result = job.fn(job)
                job.state = STOPPED if job.stop.is_set() else DONE
            except BaseException as error:  # noqa: BLE001  (the worker must survive any job)
                job.error, job.state = readable_error(error), FAILED
                if not isinstance(error, ValueError):
                    log.error("job %s (%s) failed:\n%s", job.id, job.label, traceback.format_exc())
            finally:
                job.ended = time.time()
                job.done_event.set()
