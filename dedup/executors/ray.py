"""Run the per-shard steps on Ray: a local Ray started on the spot, or an existing cluster.

``pip install 'dedup[ray]'``. The steps are the very objects the local executor runs
(:class:`dedup.featurize.FeatureStep`); nothing in a step knows about Ray. Each worker is an
actor holding the step and taking shard after shard, so the model a step builds on first use is
loaded once per actor (clip-retrieval's "pass builders, not models"). The driver keeps what
executors own: which shards still need work (the completion markers), retries, progress, and
the global stage after this one (search, clusters, outputs) runs on the driver too.

On a cluster of several machines, ``--out`` must be on storage every node sees (NFS, a mounted
bucket), since each actor writes its shard's checkpoint there, and the sources must be readable
from every node (shared paths or ``s3://`` / ``gs://`` URLs); dedup must be installed on the
nodes (or shipped with Ray's ``runtime_env``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from dedup._types import Shard
from dedup.errors import DedupError, missing_dependency
from dedup.executors.base import Markers, OnDone, OnProgress, Step, split_finished
from dedup.executors.local import ShardFailedError, _failed


def _ray() -> Any:
    try:
        import ray
    except ImportError as err:
        raise missing_dependency("ray", "ray", "--executor ray") from err
    return ray


class _StepActor:
    """Holds one step; every shard it is given runs in this process, so caches (the model)
    live as long as the actor. A step with a ``threads`` setting left at 0 (auto: the machine's
    cores) gets the actor's CPU share instead, or every actor on a node would use all its cores."""

    def __init__(self, step: Step, threads: int) -> None:
        if dataclasses.is_dataclass(step) and getattr(step, "threads", None) == 0:
            step = dataclasses.replace(step, threads=threads)  # type: ignore[type-var]
        self.step = step

    def run(self, shard: Shard) -> dict[str, Any]:
        return self.step(shard)


class RayExecutor:
    """Runs shards as calls on a pool of Ray actors (one step, one model, per actor).

    ``address``: a Ray cluster to join (``"auto"``, ``"ray://head:10001"``); None starts a
    local Ray of this run's own (:meth:`init_arguments`; ``RAY_ADDRESS``, when set, is joined
    instead) unless one is already running in this process (then it is used as is).
    ``workers``: actors (0: one per ``cpus_per_worker`` CPUs of the cluster). A shard whose
    step raises is retried ``retries`` times (on another actor when one is free); a
    :class:`~dedup.errors.DedupError` is not retried (it would fail the same way).
    """

    def __init__(
        self,
        *,
        address: str | None = None,
        workers: int = 0,
        retries: int = 1,
        cpus_per_worker: float = 1.0,
        init_options: dict[str, Any] | None = None,
    ) -> None:
        self.address = address
        self.workers = max(0, workers)
        self.retries = max(0, retries)
        self.cpus_per_worker = cpus_per_worker
        self.init_options = dict(init_options or {})
        self._holding = False
        self._started = False

    @contextmanager
    def held(self) -> Iterator[RayExecutor]:
        """Inside this block a Ray this executor starts stays up for every stage (shut down
        at the end), instead of a start and a shutdown around each stage's shards: a run's
        featurize, pixel-hash, read-back and check stages share one Ray and its start-up
        (seconds each, more on a loaded machine). Nothing starts until a stage has work."""
        self._holding = True
        try:
            yield self
        finally:
            self._holding = False
            if self._started:
                self._started = False
                _ray().shutdown()

    def run(
        self,
        step: Step,
        shards: Sequence[Shard],
        *,
        markers: Markers,
        on_done: OnDone | None = None,
        on_progress: OnProgress | None = None,
    ) -> dict[str, dict[str, Any]]:
        results, todo = split_finished(shards, markers, on_done)
        if not todo:
            return results
        ray = _ray()
        started = self._connect(ray)
        if started and self._holding:
            self._started, started = True, False  # shut down when the hold ends
        try:
            self._run(ray, step, todo, markers, results, on_done, on_progress)
        finally:
            if started:
                ray.shutdown()
        return results

    def _connect(self, ray: Any) -> bool:
        """Join or start Ray; True when this call started it (and so shuts it down after)."""
        if ray.is_initialized():
            return False
        address, options = self.init_arguments()
        try:
            ray.init(address=address, **options)
        except ConnectionError as err:
            raise DedupError(
                f"cannot join the Ray cluster at {self.address!r}: {err}; hint: check the address "
                "(ray status on the head node prints it), or leave --ray-address out to start a local Ray"
            ) from err
        return True

    def init_arguments(self) -> tuple[str | None, dict[str, Any]]:
        """What ``ray.init`` is given: the address and its options (``init_options`` last).

        Step failures come back as exceptions (one line from the CLI); worker and raylet logs
        stay in Ray's own log files rather than interleaving with the progress bars.

        Without an ``address`` (nor ``RAY_ADDRESS``) the Ray is this run's own: ``"local"``
        starts one, where ``None`` would join whatever cluster a ``ray start`` left on this
        machine (another checkout's, whose workers import its own code). And its workers run
        at this process's priority, as the local executor's do: Ray starts them 15 steps
        nicer than its raylet (``worker_niceness``, meant to keep a cluster node's daemons
        responsive), which on a shared machine gave them a share of the cores the local
        executor never loses. On the 20,000-image bench (a loaded machine) the second look's
        read took 896 s on Ray and 139 s locally, for the same CPU time inside the tasks
        (6.0-6.6 ms an image either way, measured in the step): Ray's workers were waiting.
        """
        options: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": False}
        address = self.address
        if address is None and not os.environ.get("RAY_ADDRESS"):
            address = "local"
            options["_system_config"] = {"worker_niceness": 0}
        given = dict(self.init_options)
        if "_system_config" in given and "_system_config" in options:
            given["_system_config"] = {**options["_system_config"], **given["_system_config"]}
        return address, {**options, **given}

    def _run(
        self,
        ray: Any,
        step: Step,
        todo: list[Shard],
        markers: Markers,
        results: dict[str, dict[str, Any]],
        on_done: OnDone | None,
        on_progress: OnProgress | None,
    ) -> None:
        n_actors = self.workers or max(1, int(ray.cluster_resources().get("CPU", 1) // self.cpus_per_worker))
        n_actors = min(n_actors, len(todo))
        # No restarts by Ray: a dead actor is replaced here, and its shard queued again.
        actor_class = ray.remote(num_cpus=self.cpus_per_worker, max_restarts=0)(_StepActor)
        step_ref = ray.put(step)
        threads = max(1, int(self.cpus_per_worker))
        idle = [actor_class.remote(step_ref, threads) for _ in range(n_actors)]
        queue = deque(todo)
        attempts = {s.shard_id: 0 for s in todo}
        in_flight: dict[Any, tuple[Shard, Any]] = {}
        try:
            while queue or in_flight:
                while queue and idle:
                    actor = idle.pop()
                    shard = queue.popleft()
                    in_flight[actor.run.remote(shard)] = (shard, actor)
                done, _ = ray.wait(list(in_flight), num_returns=1)
                for ref in done:
                    shard, actor = in_flight.pop(ref)
                    try:
                        stats = ray.get(ref)
                    except ray.exceptions.RayActorError:
                        # the actor's process died (out of memory, node lost): a fresh actor
                        # takes its place and the shard goes back in the queue
                        idle.append(actor_class.remote(step_ref, threads))
                        self._retry(shard, attempts, queue, RuntimeError("the Ray worker running it died"))
                        continue
                    except ray.exceptions.RayTaskError as err:
                        idle.append(actor)
                        cause = err.cause if isinstance(getattr(err, "cause", None), BaseException) else err
                        if isinstance(cause, DedupError):
                            raise _failed(shard, cause) from cause
                        self._retry(shard, attempts, queue, cause)
                        continue
                    idle.append(actor)
                    markers.write(shard, stats)
                    results[shard.shard_id] = stats
                    if on_progress is not None:
                        on_progress(int(stats.get("samples", 0)))
                    if on_done is not None:
                        on_done(shard, stats)
        finally:
            for ref in in_flight:
                ray.cancel(ref, force=True)
            for actor in idle + [a for _, a in in_flight.values()]:
                ray.kill(actor)

    def _retry(self, shard: Shard, attempts: dict[str, int], queue: deque[Shard], err: BaseException) -> None:
        attempts[shard.shard_id] += 1
        if attempts[shard.shard_id] > self.retries:
            failure = _failed(shard, err if isinstance(err, Exception) else RuntimeError(str(err)))
            raise failure if isinstance(failure, ShardFailedError) else ShardFailedError(str(failure))
        queue.append(shard)
