"""Dynamic batching: queries that arrive together share one model call and one search.

Each request puts its job on a queue and awaits its answer. One worker per index takes
the first waiting job, gathers whatever else is queued (waiting at most ``wait_ms`` for
more, up to ``max_batch``) and hands the batch to a single worker thread, so the event
loop stays free (``/healthz`` answers during a search) and the model never runs two
batches at once. Jobs queued while a batch runs form the next one: under load batches
grow by themselves, and a lone query waits only ``wait_ms``.

A job's failure is that job's alone: ``run`` returns an exception per job, and should it
raise for a whole batch (a bug, or a bad input that slipped past the request's checks),
each job of that batch is run again by itself, so only the job that fails gets the error.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Generic, TypeVar

J = TypeVar("J")
R = TypeVar("R")


class Batcher(Generic[J, R]):
    """Runs ``run(jobs) -> results`` (one result or exception per job, same order) on
    batches of submitted jobs, in ``executor``.

    Args:
        run: the batch function (called in the executor's thread).
        executor: where ``run`` runs; one thread keeps model calls one at a time.
        max_batch: most jobs per call.
        wait_ms: how long a batch's first job waits for company.
    """

    def __init__(
        self,
        run: Callable[[list[J]], Sequence[R | BaseException]],
        executor: Executor,
        max_batch: int = 64,
        wait_ms: float = 2.0,
    ) -> None:
        self.run = run
        self.executor = executor
        self.max_batch = max_batch
        self.wait = wait_ms / 1000
        self.batches = 0
        self._queue: asyncio.Queue[tuple[J, asyncio.Future[R]]] | None = None
        self._worker: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Starts the worker on the running event loop."""
        self._queue = asyncio.Queue()
        self._worker = asyncio.get_running_loop().create_task(self._work())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker

    async def submit(self, job: J) -> R:
        """The job's result, once its batch has run (its exception re-raised here)."""
        if self._queue is None:
            raise RuntimeError("Batcher.start() was not called on this event loop")
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((job, future))
        return await future

    async def _gather(self) -> list[tuple[J, asyncio.Future[R]]]:
        assert self._queue is not None
        batch = [await self._queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), left))
            except TimeoutError:
                break
        return [(job, future) for job, future in batch if not future.cancelled()]

    def _isolated(self, jobs: list[J]) -> Sequence[R | BaseException]:
        """``run(jobs)``; if it raises, each job run alone (its own result or error)."""
        try:
            return self.run(jobs)
        except Exception as err:
            if len(jobs) == 1:
                return [err]
        results: list[R | BaseException] = []
        for job in jobs:
            try:
                results.extend(self.run([job]))
            except Exception as err:
                results.append(err)
        return results

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            if not batch:
                continue
            jobs = [job for job, _ in batch]
            results = await loop.run_in_executor(self.executor, self._isolated, jobs)
            self.batches += 1
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():  # the client went away
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
