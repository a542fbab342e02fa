"""Attribution graphs on a pool of Ray actors (docs/design.md §5): placement, messaging and
recovery only. Each actor loads the replacement model once (`clt_ray.attribution.Attributor`, on
its own GPU when the cluster has GPUs); prompts are streamed to them, at most IN_FLIGHT queued per
actor; every outcome comes back to the driver, the one writer of the output folder
(`clt_ray.attribution.GraphStore`), which records it at once.

    prompts ──▶ actor.run (≤ IN_FLIGHT each) ──▶ GraphOutcome ──▶ driver: store.record
                                       at the end: one actor's dashboards ──▶ store.write_files

Recovery: a lost actor (its process or node died) gives its in-flight prompts back to the queue
and is replaced (at most `replacements` times in a run); a prompt in flight at two losses is
recorded as failed (it probably kills its worker, e.g. out of memory). With no actor left the run
stops with what is done recorded: a rerun computes the rest. Ctrl-C ends the actors; only graphs
in flight are lost.
"""

from __future__ import annotations

import os
import socket
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ray
import torch
from clt_ray.actors.autointerp import remote_user_error
from clt_ray.actors.ray_session import FORWARDED_ENV, ensure_ray
from ray.exceptions import GetTimeoutError, RayActorError
from tqdm import tqdm
from typing_extensions import Self

from clt_ray.attribution import (
    AttributionError,
    Attributor,
    Backend,
    GraphOutcome,
    GraphStore,
    Labels,
    PromptSpec,
    Upload,
)
from clt_ray.attribution.runner import prepare
from clt_ray.attribution.store import base_row
from clt_ray.config import GraphSettings
from clt_ray.errors import CltRayError
from clt_ray.fsutil import Staged, is_uri

IN_FLIGHT = 2
"""Prompts queued on an actor at once: the next one waits in its mailbox while the driver writes
the last one's graph, so an actor never idles; at most this many are lost with it."""
START_TIMEOUT_S = 900.0
"""How long an actor may take to be placed and load the model (an autoscaler adding a GPU node
takes minutes) before the run gives up on it."""


class GraphWorker:
    """One pool member: the CLT (a local folder on its node, or fetched from a store) and the
    replacement model, loaded once."""

    def __init__(self, clt: str, model: str | None, backend: Backend, device: str,
                 settings: GraphSettings, threads: int) -> None:
        torch.set_num_threads(threads)
        if is_uri(clt):
            self.staged = Staged(clt, "--clt")  # node-local copy, removed at exit
            self.staged.pull()
            clt = str(self.staged.local)
        elif not Path(clt).is_dir():
            raise AttributionError(f"the CLT folder {clt} is not on this worker's node "
                                   f"({socket.gethostname()}): put it on storage every node "
                                   "sees, or in an object store (s3://…)")
        self.attributor = Attributor(clt, model, backend=backend, device=device,
                                     settings=settings)

    def ready(self) -> int:
        return os.getpid()

    def run(self, spec: PromptSpec) -> GraphOutcome:
        return self.attributor.run(spec)

    def dashboards(self, features: list[tuple[int, int]], corpus: str | None,
                   example_tokens: int) -> dict[str, bytes]:
        return self.attributor.dashboards(features, corpus, example_tokens,
                                          log=lambda m: None)

    def peak_memory_mb(self) -> float:
        return Attributor.peak_memory_mb()


RemoteGraphWorker = ray.remote(GraphWorker)


class GraphPool:
    """`workers` GraphWorker actors (Ray must be initialised). Use as a context manager: the
    actors end with the block, however it ends."""

    def __init__(self, clt: str, *, workers: int, model: str | None = None,
                 backend: Backend = "auto", device: str | None = None,
                 settings: GraphSettings | None = None, cpus_per_worker: float = 1.0,
                 gpus_per_worker: float | None = None, replacements: int | None = None,
                 start_timeout_s: float = START_TIMEOUT_S) -> None:
        if gpus_per_worker is None:  # a GPU each where the cluster has them, unless told CPU
            has_gpus = ray.cluster_resources().get("GPU", 0) > 0
            gpus_per_worker = 1.0 if has_gpus and device in (None, "cuda") else 0.0
        device = device or ("cuda" if gpus_per_worker else "cpu")
        if device.startswith("cuda") and not gpus_per_worker:
            raise CltRayError(f"--device {device} needs --gpus-per-worker (Ray shows an actor "
                              "only the GPUs it was given)")
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        self.options = {"num_cpus": cpus_per_worker, "num_gpus": gpus_per_worker,
                        "max_restarts": 0, "max_task_retries": 0,
                        "runtime_env": {"env_vars": env}}
        self.settings = settings or GraphSettings()
        self.args = (clt, model, backend, device, self.settings, max(1, int(cpus_per_worker)))
        self.workers, self.device, self.gpus_per_worker = workers, device, gpus_per_worker
        self.replacements_left = workers if replacements is None else replacements
        self.start_timeout_s = start_timeout_s
        self.actors: list[Any] = []  # ready
        self.starting: dict[Any, tuple[Any, float]] = {}  # ready ref → (actor, started at)
        self.lost = 0
        for _ in range(workers):
            self._start()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for actor in self.actors + [a for a, _ in self.starting.values()]:
            ray.kill(actor)
        self.actors, self.starting = [], {}

    def _start(self) -> None:
        actor = RemoteGraphWorker.options(**self.options).remote(*self.args)
        self.starting[actor.ready.remote()] = (actor, time.monotonic())

    def _started(self, ref: Any) -> None:
        """An actor answered (or failed) its ready call."""
        actor, _ = self.starting.pop(ref)
        try:
            ray.get(ref)
        except RayActorError as exc:  # its constructor failed: the model, the CLT, the device
            ray.kill(actor)
            if not self.actors and not self.starting:
                raise (remote_user_error(exc) or exc) from None
            return
        self.actors.append(actor)

    def _lose(self, actor: Any) -> None:
        if actor in self.actors:
            self.actors.remove(actor)
            self.lost += 1
            ray.kill(actor)
            if self.replacements_left > 0:
                self.replacements_left -= 1
                self._start()

    def wait_started(self) -> None:
        """Until every starting actor is ready (or failed): for timing the work alone."""
        while self.starting:
            done, _ = ray.wait(list(self.starting), num_returns=1)
            self._started(done[0])

    def run(self, specs: Sequence[PromptSpec], store: GraphStore, progress: bool = False
            ) -> int:
        """Every prompt through the pool, each outcome recorded as it arrives; returns how many
        failed. Raises CltRayError when every actor is lost before the end (what is done stays
        recorded)."""
        queue, losses = deque(specs), Counter()
        pending: dict[Any, tuple[Any, PromptSpec]] = {}
        load: Counter = Counter()
        failed = 0

        def feed() -> None:
            for actor in self.actors:
                while queue and load[actor] < IN_FLIGHT:
                    spec = queue.popleft()
                    pending[actor.run.remote(spec)] = (actor, spec)
                    load[actor] += 1

        with tqdm(total=len(queue), desc="graphs", unit="graph", disable=not progress) as bar:
            while True:
                feed()
                if not pending and not (queue and self.starting):
                    break  # done, or no actor left to do the rest
                done, _ = ray.wait(list(pending) + list(self.starting), num_returns=1,
                                   timeout=10.0)
                if not done:
                    self._give_up_slow_starts()
                    continue
                ref = done[0]
                if ref in self.starting:
                    self._started(ref)
                    continue
                actor, spec = pending.pop(ref)
                load[actor] -= 1
                try:
                    outcome = ray.get(ref)
                except RayActorError:
                    self._lose(actor)
                    losses[spec.key] += 1
                    if losses[spec.key] < 2:
                        queue.appendleft(spec)
                        continue
                    outcome = GraphOutcome({**base_row(spec, self.settings), "status": "failed",
                                            "error": "two workers were lost while attributing "
                                            "it (out of memory?)"})
                store.record(outcome)
                failed += not outcome.ok
                bar.set_postfix(failed=failed, workers=len(self.actors), refresh=False)
                bar.update()
        if queue:
            raise CltRayError(f"every worker was lost ({self.lost} in all); {len(queue)} "
                              "prompts have no graph yet: rerun the same command to compute "
                              "only those")
        return failed

    def _give_up_slow_starts(self) -> None:
        now = time.monotonic()
        for ref, (actor, since) in list(self.starting.items()):
            if now - since > self.start_timeout_s:
                del self.starting[ref]
                ray.kill(actor)

    def dashboards(self, features: list[tuple[int, int]], corpus: str | None,
                   example_tokens: int) -> dict[str, bytes]:
        """Feature dashboards made by one actor (another if it is lost meanwhile)."""
        self.wait_started()
        for actor in list(self.actors):
            try:
                return ray.get(actor.dashboards.remote(features, corpus, example_tokens))
            except RayActorError:
                self._lose(actor)
                self.wait_started()
        raise CltRayError("every worker was lost before the feature dashboards were made: "
                          "rerun the same command to make them")

    def peak_memory_mb(self) -> list[float]:
        """Each ready actor's peak resident memory."""
        try:
            return ray.get([a.peak_memory_mb.remote() for a in self.actors], timeout=60)
        except GetTimeoutError:
            return []


def attribute_on_ray(
    clt: str | os.PathLike[str],
    prompts: Sequence[str | PromptSpec],
    out_dir: str | os.PathLike[str],
    *,
    workers: int,
    worker_clt: str | None = None,
    address: str | None = None,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float | None = None,
    model: str | None = None,
    backend: Backend = "auto",
    device: str | None = None,
    settings: GraphSettings | None = None,
    corpus: str | None = None,
    example_tokens: int = 16384,
    autointerp: str | None = None,
    labels: Labels | None = None,
    upload: Upload | None = None,
    clt_name: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """`attribute_prompts` with the graphs computed by `workers` Ray actors (same checks, same
    folder, same rows). worker_clt: where the actors load the CLT from (default `clt`; a URI
    when the driver's local copy is not on their nodes)."""
    settings = settings or GraphSettings()
    folder, specs, store = prepare(clt, prompts, out_dir, model=model, backend=backend,
                                   settings=settings, autointerp=autointerp, labels=labels,
                                   upload=upload, log=log, clt_name=clt_name)
    todo = store.todo(specs)
    if todo or store.wanted_dashboards():
        ensure_ray(address)
        with GraphPool(worker_clt or str(folder.path), workers=workers, model=model,
                       backend=backend, device=device, settings=settings,
                       cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker) as pool:
            log(f"{workers} graph workers on Ray ({cpus_per_worker:g} CPU, "
                f"{pool.gpus_per_worker:g} GPU each, device {pool.device})")
            pool.run(todo, store, progress=progress)
            wanted = store.wanted_dashboards()
            if wanted:
                store.write_dashboards(pool.dashboards(wanted, corpus, example_tokens))
    return store.rows_for(specs)
