"""The models one server holds: several store entries at once, each loaded version in an Engine
of its own (its batchers, queue bound, label caches and decoding threads), and the repository
API's load and unload (Triton's model repository extension) that move a name from one version
to another with no request failed.

    LIMOE_MODELS=limoe-small,clip-b32         the first is the default: requests naming no model get it
    LIMOE_MODELS=limoe-small@1,./my-entry     a pinned version; an entry directory
    LIMOE_MODEL=limoe-small                   alone, as before

Names. `name` means the name's current version: the newest one loaded. `name@2` (and the v2
`versions/{v}` path) pins one of the loaded versions. An unknown name is 404 naming the loaded
ones; a name whose first version is still loading is 503 with Retry-After.

A load (`load`; the repository API, or the store poll) reads the store anew: the newest version
of the name, or the one asked for. Beside the versions serving, it verifies the entry (checksums,
graphs), opens it and runs a warm-up pass; then the name switches to it at once, and every other
loaded version of that name retires: it takes no new requests, finishes those that hold it
(`Loaded.leases`: requests in flight, batch jobs that started on it), and is then unloaded. A
version that fails any step is refused (`LoadFailed`: a log line, limoe_model_loads_total
{outcome="refused"}, the repository API's error) and the old one keeps serving. Loads run one at
a time. Event loop only.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from limoe.runtime.model_store import (
    MANIFEST,
    ModelStore,
    ModelStoreError,
    read_manifest,
    version_key,
)
from limoe.runtime.preprocess import PixelBudget
from service.backends import Backend, load_backend
from service.batcher import PassShare, RequestShare
from service.engine import Engine
from service.errors import NotFound, NotReady, ServiceError
from service.metrics import Metrics
from service.settings import Settings, is_path

log = logging.getLogger("limoe.service")


class UnknownModel(NotFound):
    """404 not_found, naming the models served."""


class ModelLoading(NotReady):
    code = "model_loading"


class LoadFailed(ServiceError):
    """A version could not be loaded (not in the store, not verifiable, failed to open or warm up)."""

    status, code = 400, "model_load_failed"


class CannotUnload(ServiceError):
    status, code = 409, "cannot_unload"


@dataclass(frozen=True)
class ModelRef:
    """One entry of LIMOE_MODELS: a store name (with a pinned version or None for the newest) or an
    entry directory."""

    name: str  # store name; for a directory, its manifest's name once read
    version: str | None = None
    path: Path | None = None

    @classmethod
    def parse(cls, text: str) -> "ModelRef":
        if is_path(text):
            return cls(Path(text).name, None, Path(text))
        name, _, version = text.partition("@")
        return cls(name, version or None)


def split_ref(ref: str | None, version: str | None = None) -> tuple[str | None, str | None]:
    """'name@2' -> ('name', '2'); an explicit `version` wins."""
    if ref is None:
        return None, version
    name, _, pinned = ref.partition("@")
    return name, version or pinned or None


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)


def fix_mmap_threshold(nbytes: int) -> bool:
    """Allocations of `nbytes` or more get pages of their own (mmap), handed back to the OS when
    freed. glibc's default threshold rises to the size of any such block once it is freed, after
    which a burst of large bodies and decoded images is served from its heaps, and those keep the
    memory: a server stays at its peak (hundreds of MB over its working set) long after. Setting the
    threshold turns that adjustment off. False where this is not glibc."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, nbytes))
    except (OSError, AttributeError):
        return False


def release_memory() -> None:
    """Hand freed memory back to the OS after a version is unloaded: collect its cycles, then
    glibc's malloc_trim (its arenas otherwise keep the freed graphs' pages; elsewhere a no-op)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss_bytes() -> int:
    """This process's resident memory (Linux /proc; 0 where unknown)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def memory_in_use() -> int:
    """Bytes the process has allocated and not freed (glibc's mallinfo2 over all its arenas: heap
    blocks in use plus mmapped ones), so that what a model takes is counted even when it reuses
    memory freed earlier, which RSS would not show; the RSS where this is not glibc."""
    try:
        info = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return rss_bytes()
    info.restype = _MallInfo2
    m = info()
    return m.uordblks + m.hblkhd


@dataclass(eq=False)
class Loaded:
    """One loaded model version."""

    engine: Engine
    source: ModelRef
    memory_bytes: int  # memory allocated while it was opened (`memory_in_use`)
    loaded_at: float = field(default_factory=time.time)
    leases: int = 0  # requests and batch jobs holding it
    retiring: bool = False  # a newer version took over, or it is being unloaded: no new requests
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()

    @property
    def name(self) -> str:
        return self.engine.backend.name

    @property
    def version(self) -> str:
        return self.engine.backend.version

    @property
    def state(self) -> str:
        """Triton's model states: LOADING (warming up), READY, UNLOADING (retiring)."""
        return "UNLOADING" if self.retiring else "READY" if self.engine.warm else "LOADING"

    def acquire(self) -> None:
        self.leases += 1
        self.idle.clear()

    def release(self) -> None:
        self.leases -= 1
        if self.leases <= 0:
            self.leases = 0
            self.idle.set()

    @contextmanager
    def lease(self) -> Iterator[Engine]:
        self.acquire()
        try:
            yield self.engine
        finally:
            self.release()


Opener = Callable[[Settings, ModelRef], Backend]


def ref_settings(settings: Settings, ref: ModelRef) -> Settings:
    """`settings` as if LIMOE_MODEL (and LIMOE_MODEL_VERSION) named only `ref`."""
    if ref.path is not None:
        return settings.model_copy(update={"model": str(ref.path)})
    return settings.model_copy(update={"model": ref.name, "model_version": ref.version or "latest"})


def open_ref(settings: Settings, ref: ModelRef) -> Backend:
    """The backend of a reference: the store's version (newest when unpinned) or the directory,
    verified and opened as LIMOE_BACKEND says. Blocking."""
    return load_backend(ref_settings(settings, ref))


class Models:
    """The loaded model versions of one server, by name. `state`: app.state, whose `engine` is
    kept pointing at the default model's current version (what the health routes, the drain and
    older code read)."""

    def __init__(self, settings: Settings, metrics: Metrics, state: Any = None, opener: Opener = open_ref):
        self.settings, self.metrics, self.state, self.opener = settings, metrics, state, opener
        self.pixels = PixelBudget(settings.max_decode_pixels)  # one decoding budget for all models
        # and their forward passes share the cores fairly (None: each model's engine runs all its passes)
        self.share = PassShare() if settings.pass_share else None
        # and so do their requests in flight (None: no limit)
        self.requests = RequestShare(settings.shared_inflight) if settings.shared_inflight else None
        self.refs = [ModelRef.parse(r) for r in settings.model_refs]
        self.default = self.refs[0].name
        self.loaded: dict[str, list[Loaded]] = {}  # name -> versions, oldest first
        self.loading: set[str] = set()  # names being loaded for the first time
        self.refused: dict[tuple[str, str], str] = {}  # (name, version) -> why its load failed
        self._sources: dict[str, ModelRef] = {}  # name -> where a reload reads it
        self._lock = asyncio.Lock()
        self._retiring: set[asyncio.Task] = set()
        self._warm: set[asyncio.Task] = set()
        self._poller: asyncio.Task | None = None
        metrics.ready.set_function(lambda: 1.0 if self.ready else 0.0)

    # -- start and stop ---------------------------------------------------------------------------------
    async def open(self, backends: list[Backend] | None = None) -> None:
        """Open every configured model (or the given backends, in tests), the default first; their
        warm-ups then run in the background (`start`). A model that cannot be opened stops the
        start-up with its error, as a single model always did."""
        if backends is not None:
            for backend in backends:
                engine = Engine(backend, self.settings, self.metrics, self.pixels, self.share, self.requests)
                self._adopt(engine, ModelRef(backend.name), 0)
            self.default = backends[0].name
        else:
            for i, ref in enumerate(self.refs):
                before = memory_in_use()
                backend = await asyncio.to_thread(self.opener, self.settings, ref)
                engine = Engine(backend, self.settings, self.metrics, self.pixels, self.share, self.requests)
                loaded = self._adopt(engine, ref, max(0, memory_in_use() - before))
                if i == 0:
                    self.default = loaded.name  # a directory's manifest names it
        self._point_state()

    def start(self) -> None:
        """Warm every loaded version up in the background; start the store poll."""
        for versions in self.loaded.values():
            for v in versions:
                self._track(self._warm, asyncio.ensure_future(v.engine.start()))
        if self.settings.store_poll_s > 0:
            self._poller = asyncio.ensure_future(self._poll())

    async def stop(self) -> None:
        tasks = [*self._warm, *self._retiring] + ([self._poller] if self._poller else [])
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for versions in list(self.loaded.values()):
            for v in versions:
                await v.engine.stop()

    def drain(self) -> None:
        for v in self.all():
            v.engine.drain()

    @staticmethod
    def _track(tasks: set, task: asyncio.Task) -> None:
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def _point_state(self) -> None:
        if self.state is not None:
            current = self.current(self.default)
            self.state.engine = current.engine if current is not None else None

    # -- lookups --------------------------------------------------------------------------------------------
    def all(self) -> list[Loaded]:
        return [v for versions in self.loaded.values() for v in versions]

    def names(self) -> list[str]:
        return sorted(n for n, versions in self.loaded.items() if any(not v.retiring for v in versions))

    def current(self, name: str) -> Loaded | None:
        """The version `name` means: the newest one loaded that is not retiring."""
        live = [v for v in self.loaded.get(name, ()) if not v.retiring]
        return live[-1] if live else None

    @property
    def ready(self) -> bool:
        """/readyz: the default model's current version is warm and no shutdown began."""
        current = self.current(self.default)
        return current is not None and current.engine.ready and current.engine.alive

    @property
    def alive(self) -> bool:
        return all(v.engine.alive for v in self.all() if not v.retiring)

    def resolve(self, ref: str | None = None, version: str | None = None) -> Loaded:
        """The loaded version a request names (`ref`: None for the default, 'name' or 'name@v';
        `version`: a pin from a URL). 404 for an unknown name or version, 503 while the name's first
        version loads."""
        name, version = split_ref(ref, version)
        name = name or self.default
        current = self.current(name)
        if current is None:
            if name in self.loading:
                raise ModelLoading(f"model {name!r} is loading; retry shortly")
            known = ", ".join(repr(n) for n in self.names()) or "none"
            raise UnknownModel(f"unknown model {name!r}: this server serves {known}")
        if version is None:
            return current
        for v in self.loaded[name]:
            if v.version == version and not v.retiring:
                return v
        versions = ", ".join(repr(v.version) for v in self.loaded[name] if not v.retiring)
        raise UnknownModel(f"model {name!r} has no version {version!r} loaded (loaded: {versions})")

    @contextmanager
    def use(self, ref: str | None = None, version: str | None = None, ready: bool = True) -> Iterator[Engine]:
        """The engine of the version a request names, held (`Loaded.lease`) until the block ends,
        so that a retiring version finishes it before it is unloaded. `ready`: 503 until warm."""
        loaded = self.resolve(ref, version)
        if ready:
            loaded.engine.require_ready()
        with loaded.lease() as engine:
            yield engine

    # -- the repository API ------------------------------------------------------------------------------
    async def load(self, name: str, version: str | None = None) -> Loaded:
        """Load the store's newest verified version of `name` (or `version`), switch the name to it
        and retire the name's other versions. Already loaded: it becomes current, nothing is
        reopened. Raises LoadFailed; the versions serving are untouched then."""
        async with self._lock:
            source = self._sources.get(name) or ModelRef(name)
            try:
                target = await asyncio.to_thread(self._find, source, version)
            except ModelStoreError as e:
                raise self._refuse(name, version or "latest", str(e)) from None
            existing = next((v for v in self.loaded.get(name, ()) if v.version == target and not v.retiring), None)
            if existing is not None:
                self._retire_others(existing)
                return existing
            first = self.current(name) is None
            if first:
                self.loading.add(name)
            try:
                pinned = ModelRef(name, target, source.path)
                before = memory_in_use()
                try:
                    backend = await asyncio.to_thread(self.opener, self.settings, pinned)
                except Exception as e:  # ModelStoreError, ONNX Runtime's errors, a bad device
                    raise self._refuse(name, target, f"{type(e).__name__}: {e}") from None
                if backend.name != name:
                    raise self._refuse(name, target, f"the entry's manifest names {backend.name!r}")
                memory = max(0, memory_in_use() - before)
                engine = Engine(backend, self.settings, self.metrics, self.pixels, self.share, self.requests)
                try:
                    await engine.start(self._hot_sizes())
                except Exception as e:
                    await engine.stop()
                    engine.metrics.forget()
                    raise self._refuse(name, target, f"warm-up failed: {e}") from None
                if self.draining:
                    await engine.stop()
                    raise LoadFailed("the server is shutting down")
                loaded = self._adopt(engine, pinned, memory)
            finally:
                self.loading.discard(name)
            self._retire_others(loaded)
            self.refused.pop((name, target), None)
            self.metrics.model_loads.labels(name, "loaded").inc()
            log.info("model %s version %s loaded (%.0f MB resident); now serving it", name, target, memory / 2 ** 20)
            return loaded

    @property
    def draining(self) -> bool:
        current = self.current(self.default)
        return current is not None and current.engine.draining

    def _find(self, source: ModelRef, version: str | None) -> str:
        """The version a load would open (not yet verified: the opener does that)."""
        if source.path is not None:
            return read_manifest(source.path).version
        return ModelStore(self.settings.model_store).resolve(source.name, version or "latest").name

    def _hot_sizes(self) -> list[int]:
        """The batch sizes a version loaded while others serve warms up with: one pass, and the
        largest batch (its buffers). Start-up warms every size (Engine.warm_up_sizes)."""
        return sorted({1, self.settings.max_batch_size})

    def _refuse(self, name: str, version: str, why: str) -> LoadFailed:
        self.refused[(name, version)] = why
        self.metrics.model_loads.labels(name, "refused").inc()
        log.error("model %s version %s refused; the versions serving go on: %s", name, version, why)
        return LoadFailed(f"model {name!r} version {version!r} was not loaded: {why}")

    def _adopt(self, engine: Engine, ref: ModelRef, memory: int) -> Loaded:
        b = engine.backend
        loaded = Loaded(engine, ref, memory)
        versions = self.loaded.setdefault(b.name, [])
        if any(v.version == b.version for v in versions):
            raise LoadFailed(f"model {b.name!r} version {b.version!r} is listed twice")
        versions.append(loaded)
        versions.sort(key=lambda v: version_key(v.version))
        self._sources.setdefault(b.name, ref if ref.path is not None else ModelRef(ref.name))
        self.metrics.model_info.labels(b.name, b.version, self.settings.backend, b.device).set(1)
        engine.metrics.model_memory.set(memory)
        return loaded

    def _retire_others(self, keep: Loaded) -> None:
        """`keep` becomes its name's current version; the others retire."""
        for v in self.loaded.get(keep.name, ()):
            if v is not keep and not v.retiring:
                self._retire(v)
        # `keep` may be older than a retired one: current() takes the newest not retiring
        self._point_state()

    def _retire(self, v: Loaded) -> None:
        v.retiring = True
        v.engine.metrics.model_ready.set(0)
        task = asyncio.ensure_future(self._unload_when_idle(v))
        self._track(self._retiring, task)
        # once the task (and with it the last reference to the version) is gone, trim the heap
        task.add_done_callback(lambda _: self._track(self._retiring, asyncio.ensure_future(
            asyncio.to_thread(release_memory))))

    async def _unload_when_idle(self, v: Loaded) -> None:
        await v.idle.wait()
        await v.engine.stop()
        versions = self.loaded.get(v.name, [])
        if v in versions:
            versions.remove(v)
        if not versions:
            self.loaded.pop(v.name, None)
        try:
            self.metrics.model_info.remove(v.name, v.version, self.settings.backend, v.engine.backend.device)
        except KeyError:
            pass
        v.engine.metrics.forget()
        self.metrics.model_loads.labels(v.name, "unloaded").inc()
        log.info("model %s version %s unloaded", v.name, v.version)

    async def unload(self, name: str) -> int:
        """Stop sending requests to any version of `name`; each is unloaded once the requests and
        jobs holding it are done. Returns how many versions retire. The default model cannot be
        unloaded (readiness hangs on it)."""
        async with self._lock:
            if name == self.default:
                raise CannotUnload(f"model {name!r} is this server's default (the first of LIMOE_MODELS): load "
                                   "another version of it instead, or restart with another default")
            live = [v for v in self.loaded.get(name, ()) if not v.retiring]
            if not live:
                known = ", ".join(repr(n) for n in self.names()) or "none"
                raise UnknownModel(f"model {name!r} is not loaded (loaded: {known})")
            for v in live:
                self._retire(v)
            return len(live)

    async def wait_retired(self) -> None:
        """Until every retiring version has been unloaded (tests, benchmarks)."""
        while self._retiring:
            await asyncio.gather(*list(self._retiring), return_exceptions=True)

    def index(self, ready_only: bool = False) -> list[dict[str, str]]:
        """Triton's repository index: every version in the store and every loaded one, with its
        state (READY, LOADING, UNLOADING, UNAVAILABLE) and, for UNAVAILABLE, why."""
        rows: dict[tuple[str, str], dict[str, str]] = {}
        store = ModelStore(self.settings.model_store)
        for name in store.names():
            for version in store.versions(name):
                why = self.refused.get((name, version), "not loaded")
                rows[(name, version)] = {"name": name, "version": version, "state": "UNAVAILABLE", "reason": why}
        for v in self.all():
            rows[(v.name, v.version)] = {"name": v.name, "version": v.version, "state": v.state, "reason": ""}
        for (name, version), why in self.refused.items():
            rows.setdefault((name, version), {"name": name, "version": version, "state": "UNAVAILABLE",
                                              "reason": why})
        out = [rows[k] for k in sorted(rows, key=lambda k: (k[0], version_key(k[1])))]
        return [r for r in out if r["state"] == "READY"] if ready_only else out

    # -- the store poll ------------------------------------------------------------------------------------
    async def _poll(self) -> None:
        """Every LIMOE_STORE_POLL_S: load a newer store version of each served name not pinned to
        a version (one refused before is tried again only if its manifest changed)."""
        seen: dict[tuple[str, str], float] = {}
        while True:
            await asyncio.sleep(self.settings.store_poll_s)
            try:
                for name in self.names():
                    newest = await asyncio.to_thread(self._newest, name)
                    current = self.current(name)
                    if newest is None or current is None or version_key(newest[0]) <= version_key(current.version):
                        continue
                    if seen.get((name, newest[0])) == newest[1]:
                        continue  # refused before, unchanged since
                    seen[(name, newest[0])] = newest[1]
                    try:
                        await self.load(name, newest[0])
                    except LoadFailed:
                        pass  # logged and counted; the current version serves on
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the poll die
                log.exception("store poll failed")

    def _newest(self, name: str) -> tuple[str, float] | None:
        """(version, manifest mtime) of the store's newest version of `name`, for names served
        from the store without a pinned version."""
        ref = self._sources.get(name)
        if ref is None or ref.path is not None or any(r.name == name and r.version for r in self.refs):
            return None
        store = ModelStore(self.settings.model_store)
        versions = store.versions(name)
        if not versions:
            return None
        try:
            return versions[-1], (store.root / name / versions[-1] / MANIFEST).stat().st_mtime
        except OSError:
            return None
