"""Hot reload under load, and two models sharing one server's cores: `limoe serve` on a copy of
the shipped store, driven by real HTTP clients on loopback.

    python bench/model_rollout.py                      # the issue's run: 64 clients, 60 s of switches
    python bench/model_rollout.py --json docs/results/model_rollout.json
    python bench/model_rollout.py --quick               # a few seconds of each part (the test runs it)

Parts, each printing what it measured:
1. rollout: `limoe-small` version 1 serves; version 2 (a copy of 1 with its manifest's version
   changed, as a republished entry) is added to the store, and the repository API switches
   1 -> 2 -> 1 -> 2 at even intervals while the clients classify. Every answer's status and
   version are recorded; p99 of requests that began within a second either side of a switch
   against p99 of the steady part before the first; the server's RSS sampled every 0.2 s.
2. corrupt: a version 3 with one graph byte changed is loaded under the same load: refused (400),
   and every request still answered 200 by the version serving.
3. unload: with `limoe-tiny` served beside it, clients on limoe-tiny while it is unloaded: the
   requests that began before the unload all answer 200, those that begin after it 404.
4. fairness: p99 of a few clients on limoe-tiny, alone and while many clients flood limoe-small
   on the same server (one model's flood must not starve the other). The probing clients run in
   a process of their own, so their latencies hold no wait for this process's GIL behind the
   flood's client threads; the server's CPU during the flood is split into its event loop and
   the other threads (forward passes, decoding). Unless --quick, the same is measured again
   on a server without the passes' fair share (LIMOE_PASS_SHARE=false, LIMOE_PASS_NICE=0), the
   baseline, in the same run, and once more with each model in a server process of its own
   (process-per-model isolation, sharing nothing but the cores): the reference for how fair one
   server can be on these cores, printed as one server's p99 beside the flood over the separate
   servers'.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import multiprocessing
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._server import ROOT, Server  # noqa: E402

ADMIN_KEY = "rollout-bench-admin"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
LABELS = ["rocket", "cat", "pizza", "house"]


def image_b64(seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def add_version(store: Path, name: str, source: str, version: str, corrupt: bool = False) -> Path:
    """A copy of `name`/`source` as `name`/`version` (a republished entry); `corrupt`: one graph
    byte changed (its checksum then fails). The tests use it too."""
    entry = store / name / version
    shutil.copytree(store / name / source, entry)
    manifest = json.loads((entry / "manifest.json").read_text())
    manifest["version"] = version
    (entry / "manifest.json").write_text(json.dumps(manifest))
    if corrupt:
        graph = next(entry.glob("*.onnx"))
        data = bytearray(graph.read_bytes())
        data[len(data) // 2] ^= 0xFF
        graph.write_bytes(bytes(data))
    return entry


@dataclass
class Answer:
    start: float
    end: float
    status: int
    version: str | None


@dataclass
class Load:
    """`clients` threads classifying on `model` until stopped; every answer recorded."""

    base: str
    clients: int
    model: str | None = None
    answers: list[Answer] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def _client(self, k: int) -> None:
        body = {"images": [image_b64(k)], "labels": LABELS, **({"model": self.model} if self.model else {})}
        with httpx.Client(base_url=self.base, timeout=60) as c:
            while not self.stop.is_set():
                t0 = time.monotonic()
                try:
                    r = c.post("/v1/classify", json=body)
                    status, version = r.status_code, (r.json().get("version") if r.status_code == 200 else None)
                except httpx.HTTPError:
                    status, version = -1, None
                self.answers.append(Answer(t0, time.monotonic(), status, version))

    def __enter__(self) -> "Load":
        self.pool = ThreadPoolExecutor(self.clients)
        for k in range(self.clients):
            self.pool.submit(self._client, k)
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.pool.shutdown(wait=True)


class RSS:
    """The server's resident memory, sampled every 0.2 s."""

    def __init__(self, server: Server):
        self.server, self.samples, self.stop = server, [], threading.Event()

    def _run(self) -> None:
        while not self.stop.is_set():
            self.samples.append(self.server.rss())
            time.sleep(0.2)

    def __enter__(self) -> "RSS":
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def p99_ms(answers: list[Answer]) -> float:
    return float(np.percentile([(a.end - a.start) * 1000 for a in answers], 99)) if answers else float("nan")


def statuses(answers: list[Answer]) -> dict[str, int]:
    out: dict[str, int] = {}
    for a in answers:
        out[str(a.status)] = out.get(str(a.status), 0) + 1
    return out


def load_version(base: str, name: str, version: str | None = None) -> tuple[int, dict, float]:
    t0 = time.monotonic()
    body = {"parameters": {"version": version}} if version else {}
    r = httpx.post(f"{base}/v2/repository/models/{name}/load", headers=ADMIN, json=body, timeout=300)
    return r.status_code, r.json(), time.monotonic() - t0


def serve(store: Path, jobs: Path, models: str, **env) -> Server:
    return Server("rollout bench", model_store=str(store), models=models, admin_keys=ADMIN_KEY, jobs_dir=str(jobs),
                  **env)


def rollout(store: Path, jobs: Path, clients: int, seconds: float, switches: int) -> dict:
    with serve(store, jobs, "limoe-small") as server:
        server.wait_ready()
        add_version(store, "limoe-small", "1", "2")
        steady_s = seconds / (switches + 1)
        events = []
        with RSS(server) as rss, Load(server.base, clients) as load:
            t0 = time.monotonic()
            rss_ready = server.rss()
            time.sleep(steady_s)
            for k in range(switches):
                target = "2" if k % 2 == 0 else "1"
                started = time.monotonic()
                status, body, took = load_version(server.base, "limoe-small", target)
                events.append({"to": target, "status": status, "at_s": round(started - t0, 2),
                               "load_s": round(took, 2), "answer": body})
                time.sleep(max(0.0, t0 + steady_s * (k + 2) - time.monotonic()))
        answers = load.answers
    warm_from = t0 + min(3.0, steady_s / 3)  # the clients' first requests set up connections
    steady = [a for a in answers if warm_from <= a.start < t0 + steady_s]
    around = [a for a in answers if any(t0 + e["at_s"] - 1 <= a.start <= t0 + e["at_s"] + e["load_s"] + 1
                                        for e in events)]
    versions = sorted({a.version for a in answers if a.version})
    return {"clients": clients, "seconds": seconds, "switches": events, "answers": statuses(answers),
            "non_200": sum(a.status != 200 for a in answers), "versions_answering": versions,
            "p99_steady_ms": round(p99_ms(steady), 1), "p99_around_switch_ms": round(p99_ms(around), 1),
            "p99_ratio": round(p99_ms(around) / p99_ms(steady), 2),
            "rss_ready_mb": round(rss_ready / 2 ** 20, 1), "rss_peak_mb": round(max(rss.samples) / 2 ** 20, 1),
            "rss_end_mb": round(rss.samples[-1] / 2 ** 20, 1)}


def corrupt(store: Path, jobs: Path, clients: int, seconds: float) -> dict:
    with serve(store, jobs, "limoe-small@2") as server:  # pinned: start on 2 although 3 is newest
        server.wait_ready()
        add_version(store, "limoe-small", "1", "3", corrupt=True)
        with Load(server.base, clients) as load:
            time.sleep(seconds / 2)
            status, body, _ = load_version(server.base, "limoe-small", "3")
            time.sleep(seconds / 2)
    return {"load_status": status, "load_answer": body, "answers": statuses(load.answers),
            "non_200": sum(a.status != 200 for a in load.answers),
            "versions_answering": sorted({a.version for a in load.answers if a.version})}


def unload(store: Path, jobs: Path, clients: int, seconds: float) -> dict:
    with serve(store, jobs, "limoe-small@2,limoe-tiny") as server:
        server.wait_ready()
        with Load(server.base, clients, model="limoe-tiny") as load:
            time.sleep(seconds / 2)
            at = time.monotonic()
            r = httpx.post(f"{server.base}/v2/repository/models/limoe-tiny/unload", headers=ADMIN, timeout=60)
            answered = time.monotonic()
            time.sleep(seconds / 2)
    # begun before the unload was sent, and after its answer came back (between the two, either is right)
    before = [a for a in load.answers if a.start < at]
    after = [a for a in load.answers if a.start > answered]
    return {"unload_status": r.status_code, "before": statuses(before), "after": statuses(after),
            "before_all_200": all(a.status == 200 for a in before),
            "after_all_404": all(a.status == 404 for a in after) and bool(after)}


def probe(base: str, clients: int, model: str, seconds: float) -> list[Answer]:
    """`clients` classifying on `model` for `seconds`: run in a process of its own (`probed`), so
    that its latencies do not include waiting for the GIL behind the flood's client threads."""
    with Load(base, clients, model=model) as load:
        time.sleep(seconds)
    return load.answers


def probed(base: str, clients: int, model: str, seconds: float) -> list[Answer]:
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(probe, base, clients, model, seconds).result(timeout=seconds + 120)


def fairness(store: Path, jobs: Path, probe_clients: int, flood_clients: int, seconds: float,
             separate: bool = False, **env) -> dict:
    """limoe-tiny probed alone, then beside a flood of limoe-small: both models in one server, or
    (`separate`) each in a server process of its own, the two sharing nothing but the cores."""
    with contextlib.ExitStack() as stack:
        if separate:
            servers = [stack.enter_context(serve(store, jobs, "limoe-tiny", **env)),
                       stack.enter_context(serve(store, jobs.with_name(jobs.name + "-flood"), "limoe-small@2", **env))]
        else:
            servers = [stack.enter_context(serve(store, jobs, "limoe-small@2,limoe-tiny", **env))]
        for server in servers:
            server.wait_ready()
        probe_base, flood_base = servers[0].base, servers[-1].base
        alone = probed(probe_base, probe_clients, "limoe-tiny", seconds)
        with Load(flood_base, flood_clients, model="limoe-small") as flood:
            time.sleep(min(2.0, seconds / 3))
            cpu0, t0 = [s.cpu() for s in servers], time.monotonic()
            shared = probed(probe_base, probe_clients, "limoe-tiny", seconds)
            cpu1, t1 = [s.cpu() for s in servers], time.monotonic()
    skip = lambda xs: xs[len(xs) // 10:]  # noqa: E731 (connection set-up)
    a, s = skip(alone), skip(shared)
    cores = lambda part: round(sum(c1[part] - c0[part] for c0, c1 in zip(cpu0, cpu1)) / (t1 - t0), 2)  # noqa: E731
    return {"settings": env, "servers": len(servers), "probe_clients": probe_clients, "flood_clients": flood_clients,
            "tiny_alone_p99_ms": round(p99_ms(a), 1), "tiny_beside_flood_p99_ms": round(p99_ms(s), 1),
            "p99_ratio": round(p99_ms(s) / p99_ms(a), 2),
            "tiny_answers_per_s_alone": round(len(a) / seconds, 1),
            "tiny_answers_per_s_beside_flood": round(len(s) / seconds, 1),
            "flood_answers_per_s": round(len(flood.answers) / (seconds + min(2.0, seconds / 3)), 1),
            # the servers' cores during the flood: their event loops (one thread each) and the rest
            "server_cores_event_loop": cores("main"), "server_cores_other": cores("other"),
            "non_200": sum(x.status != 200 for x in [*alone, *shared, *flood.answers])}


# The fairness part's baseline: each model's encoders run all their passes, at the process's priority,
# and each takes any number of requests in flight.
BASELINE = {"pass_share": "false", "pass_nice": "0", "shared_inflight": "0"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=60.0, help="of the rollout part")
    ap.add_argument("--switches", type=int, default=3, help="1 -> 2 -> 1 -> 2 is 3")
    ap.add_argument("--quick", action="store_true", help="8 clients and a few seconds per part")
    ap.add_argument("--parts", default="rollout,corrupt,unload,fairness", help="which parts, comma-separated")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    parts = set(args.parts.split(","))
    if args.quick:
        args.clients, args.seconds = 8, 8.0
    part_s = args.seconds / 4 if args.quick else 20.0
    given = argv if argv is not None else sys.argv[1:]
    results: dict = {"command": " ".join(["python bench/model_rollout.py", *given])}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        for name in ("limoe-small", "limoe-tiny"):
            shutil.copytree(ROOT / "model_store" / name / "1", base / "store" / name / "1")
        if "rollout" not in parts:  # the other parts serve the version 2 that the rollout adds
            add_version(base / "store", "limoe-small", "1", "2")
        if "rollout" in parts:
            results["rollout"] = r = rollout(base / "store", base / "jobs", args.clients, args.seconds, args.switches)
            print(f"rollout: {args.clients} clients, {args.seconds:.0f} s, switches "
                  f"{' -> '.join(['1'] + [e['to'] for e in r['switches']])} (loads took "
                  f"{', '.join(str(e['load_s']) for e in r['switches'])} s): answers {r['answers']}, non-200 "
                  f"{r['non_200']}, versions answering {r['versions_answering']}; p99 steady {r['p99_steady_ms']} ms, "
                  f"around a switch {r['p99_around_switch_ms']} ms ({r['p99_ratio']}x); RSS ready {r['rss_ready_mb']} "
                  f"MB, peak {r['rss_peak_mb']} MB, end {r['rss_end_mb']} MB")
        if "corrupt" in parts:
            results["corrupt"] = c = corrupt(base / "store", base / "jobs", args.clients, part_s)
            print(f"corrupt version: load answered {c['load_status']} ({c['load_answer'].get('code')}); answers "
                  f"{c['answers']}, non-200 {c['non_200']}, versions answering {c['versions_answering']}")
        if "unload" in parts:
            results["unload"] = u = unload(base / "store", base / "jobs", max(4, args.clients // 8), part_s)
            print(f"unload under load: {u['unload_status']}; begun before: {u['before']} (all 200: "
                  f"{u['before_all_200']}); after: {u['after']} (all 404: {u['after_all_404']})")
        if "fairness" in parts:
            runs = {"fairness": {}} if args.quick else {"fairness_baseline": BASELINE, "fairness": {},
                                                        "fairness_separate": {"separate": True}}
            for key, env in runs.items():
                results[key] = f = fairness(base / "store", base / "jobs", 4, max(8, args.clients - 4), part_s, **env)
                print(f"{key}{' ' + str(env) if env else ''}: {f['servers']} server(s); limoe-tiny p99 alone {f['tiny_alone_p99_ms']} ms "
                      f"({f['tiny_answers_per_s_alone']}/s), beside {f['flood_clients']} clients flooding limoe-small "
                      f"{f['tiny_beside_flood_p99_ms']} ms ({f['tiny_answers_per_s_beside_flood']}/s): "
                      f"{f['p99_ratio']}x; flood {f['flood_answers_per_s']}/s; server cores during it: event loop "
                      f"{f['server_cores_event_loop']}, other threads {f['server_cores_other']}; "
                      f"non-200 {f['non_200']}")
            if "fairness_separate" in results:
                one, two = results["fairness"], results["fairness_separate"]
                results["fairness_vs_separate"] = ratio = round(one["tiny_beside_flood_p99_ms"]
                                                               / two["tiny_beside_flood_p99_ms"], 2)
                print(f"fairness: limoe-tiny p99 beside the flood, one server / a server per model: {ratio}x "
                      f"({one['tiny_beside_flood_p99_ms']} / {two['tiny_beside_flood_p99_ms']} ms)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
