"""Dynamic batching: concurrent requests gathered into one call of the model.

A :class:`Batcher` queues what requests submit and hands ``process`` a list of them: as many as
arrived, up to ``max_batch`` rows, waiting at most ``max_wait_ms`` after the first one. The call
runs on a worker thread (one model at a time), so the event loop keeps reading requests while the
model runs, and requests that arrive meanwhile make the next batch. Each request gets back its
own result, as if it had been processed alone: rows are scored independently, the batch only
shares the forward pass.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class Batcher(Generic[Item, Result]):
    """Gathers submitted items into batches for ``process(items) -> one result per item``.

    ``size(item)`` is an item's row count; an item larger than ``max_batch`` goes alone. ``process``
    runs on ``executor``; an exception it raises is raised to every request of that batch.
    """

    def __init__(
        self,
        process: Callable[[list[Item]], list[Result]],
        size: Callable[[Item], int],
        executor: Executor,
        max_batch: int = 256,
        max_wait_ms: float = 2.0,
        observe: Callable[[int], None] | None = None,
    ) -> None:
        self.process, self.size, self.executor = process, size, executor
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000
        self.observe = observe or (lambda rows: None)  # told the rows of every batch processed
        self._pending: deque[tuple[Item, asyncio.Future]] = deque()
        self._pending_rows = 0
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._closed = False

    async def submit(self, item: Item) -> Result:
        """The result of ``item``, processed in a batch with the items submitted about the same time."""
        loop = asyncio.get_running_loop()
        if self._closed:  # a request that began before the batcher was replaced
            return (await self._run([item]))[0]
        if self._worker is None:
            self._arrived = asyncio.Event()
            self._worker = loop.create_task(self._serve())
        future = loop.create_future()
        self._pending.append((item, future))
        self._pending_rows += self.size(item)
        self._arrived.set()
        return await future

    async def close(self) -> None:
        """Process what is queued, then stop; later submissions are processed one by one."""
        self._closed = True
        if self._worker is not None:
            self._arrived.set()
            await self._worker

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                if self._closed:
                    return
                self._arrived.clear()
                await self._arrived.wait()
            deadline = loop.time() + self.max_wait
            while not self._closed and self._pending_rows < self.max_batch and loop.time() < deadline:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), deadline - loop.time())
                except TimeoutError:
                    break
            batch = self._take()
            try:
                results = await self._run([item for item, _ in batch])
            except Exception as err:  # handed to each request of the batch, which reports it
                for _, future in batch:
                    if not future.done():
                        future.set_exception(err)
                continue
            for (_, future), result in zip(batch, results):
                if not future.done():  # a request whose client left is cancelled
                    future.set_result(result)

    def _take(self) -> list[tuple[Item, asyncio.Future]]:
        """The queued items of the next batch: the first one, then as many as fit ``max_batch``."""
        batch = [self._pending.popleft()]
        rows = self.size(batch[0][0])
        while self._pending and rows + self.size(self._pending[0][0]) <= self.max_batch:
            rows += self.size(self._pending[0][0])
            batch.append(self._pending.popleft())
        self._pending_rows -= rows
        return batch

    async def _run(self, items: list[Item]) -> list[Result]:
        results = await asyncio.get_running_loop().run_in_executor(self.executor, self.process, items)
        self.observe(sum(map(self.size, items)))
        return results
