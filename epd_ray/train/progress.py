"""Progress from the pretraining tasks to the driver's output while the driver waits for them.

epd-ray starts Ray with `log_to_driver` off (quiet), so a task's prints never reach the terminal. Instead each
task puts small dicts into a Ray queue (an actor that holds no CPU, so it never waits for the tasks' cores) and
a thread of the driver hands each to `echo` as it comes, on one node as on many.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable

import ray
from ray.util.queue import Queue

POLL_S = 0.2


class ProgressFeed:
    """Driver side: `with ProgressFeed(echo) as feed:` pass `feed.queue` to the tasks, then wait for them."""

    def __init__(self, echo: Callable[[dict[str, Any]], None]):
        self.echo = echo
        self.queue = Queue(actor_options={"num_cpus": 0})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, daemon=True)

    def __enter__(self) -> "ProgressFeed":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._drain()  # what arrived after the last poll
        ray.kill(self.queue.actor)

    def _pump(self) -> None:
        while not self._stop.is_set():
            try:
                self.echo(self.queue.get(timeout=POLL_S))
            except queue.Empty:
                continue
            except Exception:  # the actor is gone (the cluster is shutting down): no more progress to show
                return

    def _drain(self) -> None:
        try:
            while True:
                self.echo(self.queue.get_nowait())
        except Exception:
            return


def send(feed: Queue | None, item: dict[str, Any]) -> None:
    """Worker side: put one progress item, without waiting for it to arrive; a lost feed never stops training.

    `Queue.put_nowait` would `ray.get` the put, and a Ray task blocked in `ray.get` hands its CPUs back for
    the wait: Ray then starts another task in them, and more networks train at once than the cores hold."""
    if feed is None:
        return
    try:
        feed.actor.put_nowait.remote(item)
    except Exception:
        pass
