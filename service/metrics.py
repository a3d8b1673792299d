"""Prometheus metrics, one registry per app (so several apps in one process never collide).

Names follow Prometheus conventions: base units (seconds), `_total` counters. What only an MoE
server can show: tokens routed to each expert, and tokens dropped at capacity, per MoE layer
and modality.

A server holds several models (service/models.py): the series of what one model does (its
queues, forward passes, caches, experts) carry `model` and `version` labels first; an engine
counts through `ModelMetrics`, which fills them in. The HTTP series stay per server.
"""

from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

from limoe.runtime.routing_counts import expert_counts

M = ["model", "version"]  # the labels that name the model version a series is about
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("limoe_requests_total", "HTTP requests by route and status code",
                                ["route", "method", "status"], registry=r)
        self.request_seconds = Histogram("limoe_request_duration_seconds", "HTTP request latency",
                                         ["route"], buckets=_LATENCY, registry=r)
        self.queue_seconds = Histogram("limoe_queue_wait_seconds", "time an item waited for its batch",
                                       [*M, "encoder"], buckets=_LATENCY, registry=r)
        self.preprocess_seconds = Histogram("limoe_preprocess_seconds", "decode + resize + normalise one image",
                                            M, buckets=_LATENCY, registry=r)
        self.inference_seconds = Histogram("limoe_inference_seconds", "one batched forward pass",
                                           [*M, "encoder"], buckets=_LATENCY, registry=r)
        self.inference_stuck = Counter("limoe_inference_stuck_total", "forward passes that did not return within "
                                       "LIMOE_INFER_TIMEOUT_S (their items got 504)", [*M, "encoder"], registry=r)
        self.batch_size = Histogram("limoe_batch_size", "items per forward pass", [*M, "encoder"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.body_bytes = Gauge("limoe_request_body_bytes_in_flight",
                                "request-body bytes held by requests in flight (LIMOE_MAX_INFLIGHT_BYTES bounds it)",
                                registry=r)
        self.queue_depth = Gauge("limoe_queue_depth", "items waiting for a forward pass", [*M, "encoder"], registry=r)
        self.items = Counter("limoe_items_total", "images and texts processed, by outcome",
                             [*M, "encoder", "outcome"], registry=r)
        self.label_cache = Counter("limoe_label_cache_total", "label embedding lookups", [*M, "result"], registry=r)
        self.label_cache_size = Gauge("limoe_label_cache_entries", "label embeddings cached", M, registry=r)
        self.label_set_cache = Counter("limoe_label_set_cache_total", "lookups of a whole label set's class matrix",
                                       [*M, "result"], registry=r)
        self.label_set_cache_bytes = Gauge("limoe_label_set_cache_bytes", "bytes of label-set class matrices cached",
                                           M, registry=r)
        self.expert_tokens = Counter("limoe_expert_tokens_total", "tokens routed to an expert (all K choices)",
                                     [*M, "layer", "modality", "expert"], registry=r)
        self.expert_dropped = Counter("limoe_expert_tokens_dropped_total",
                                      "token choices dropped because the expert was full",
                                      [*M, "layer", "modality", "expert"], registry=r)
        self.model_info = Gauge("limoe_model_info", "the loaded models (value 1 per loaded version)",
                                ["name", "version", "backend", "device"], registry=r)
        self.ready = Gauge("limoe_ready", "1 while ready for traffic: the default model answered a warm-up forward "
                           "pass, and no shutdown began", registry=r)
        self.model_ready = Gauge("limoe_model_ready", "1 while this model version is warm and serving", M, registry=r)
        self.model_memory = Gauge("limoe_model_memory_bytes", "memory the process allocated (and still "
                                  "holds) while this model version was opened", M, registry=r)
        self.model_loads = Counter("limoe_model_loads_total", "model versions loaded, refused (not verifiable, "
                                   "failed to open or warm up) and unloaded", ["model", "outcome"], registry=r)
        # The autoscaling signal (a KEDA Prometheus trigger): requests, like Knative's concurrency,
        # because a replica's latency grows with the requests it holds. Health probes and scrapes
        # are left out (a scrape would always count itself). For images rather than requests, use
        # limoe_queue_depth{encoder="image"}.
        self.batch_jobs = Gauge("limoe_batch_jobs", "batch jobs (/v1/batches) by status", ["status"], registry=r)
        self.batch_lines = Counter("limoe_batch_job_lines_total", "batch jobs' requests answered, by outcome "
                                   "(completed: 2xx, in the output file; failed: in the error file)",
                                   ["outcome"], registry=r)
        self.jobs_store_faults = Counter("limoe_jobs_store_faults_total", "operations of the batch jobs store that "
                                         "failed, by reason (disk_full, read_only, damaged, missing, io)",
                                         ["reason"], registry=r)
        self.jobs_store_healthy = Gauge("limoe_jobs_store_healthy", "1 while the jobs store's last operation "
                                        "succeeded; 0 after a fault, until one succeeds", registry=r)
        self.jobs_store_recovered = Counter("limoe_jobs_store_recovered_total", "jobs databases found damaged (moved "
                                            "aside, salvaged into a new one) or deleted (rewritten from the open "
                                            "connection)", ["reason"], registry=r)
        self.inflight = Gauge("limoe_inflight_requests", "HTTP requests being handled (received, not yet answered), "
                              "not counting health probes and metrics scrapes; a shutdown waits for them",
                              registry=r)

    def for_model(self, name: str, version: str) -> "ModelMetrics":
        return ModelMetrics(self, name, version)


PER_MODEL = ("queue_seconds", "preprocess_seconds", "inference_seconds", "inference_stuck", "batch_size", "queue_depth", "items",
             "label_cache", "label_cache_size", "label_set_cache", "label_set_cache_bytes", "model_ready",
             "model_memory")
GAUGES = {"queue_depth": [("image",), ("text",)], "label_cache_size": [()], "label_set_cache_bytes": [()],
          "model_ready": [()], "model_memory": [()]}  # and the label values after (model, version)


class _Bound:
    """A metric family with its first labels (model, version) given: `.labels(*rest)` as the
    family's; a family with no other labels is used directly (`.observe`, `.set`, `.inc`)."""

    def __init__(self, family: MetricWrapperBase, prefix: tuple[str, ...]):
        self.family, self.prefix = family, prefix

    def labels(self, *rest: str):
        return self.family.labels(*self.prefix, *rest)

    def __getattr__(self, attr: str):
        return getattr(self.family.labels(*self.prefix), attr)


class ModelMetrics:
    """What one model version counts: the per-model families of a server's `Metrics` with its
    `model` and `version` labels filled in, under the same attribute names (an Engine and its
    batchers count through it as they would through `Metrics`); the rest is the server's."""

    def __init__(self, server: Metrics, name: str, version: str):
        self.server, self.name, self.version = server, name, version
        for attr in PER_MODEL:
            setattr(self, attr, _Bound(getattr(server, attr), (name, version)))
        self._children: dict[tuple, list[tuple]] = {}  # see _expert_children

    def __getattr__(self, attr: str):  # server-wide series (requests, batch jobs, ...)
        return getattr(self.server, attr)

    def value(self, sample: str, **labels: str) -> float | None:
        """One of this version's samples, e.g. value("limoe_label_cache_total", result="hit")."""
        return self.server.registry.get_sample_value(sample, {"model": self.name, "version": self.version, **labels})

    def forget(self) -> None:
        """Drop this version's gauges (it was unloaded); its counters stay until the process ends,
        as Prometheus expects of counters."""
        for attr, rest in GAUGES.items():
            for labels in rest:
                try:
                    getattr(self.server, attr).remove(self.name, self.version, *labels)
                except KeyError:  # never set
                    pass

    def observe_routing(self, modality: str, layers: list[int], num_experts: int,
                        expert_index: np.ndarray, dropped: np.ndarray) -> None:
        """Count a batch's expert choices: expert_index/dropped (B, M, T, K); -1 marks padding."""
        routed_all, lost_all = expert_counts(expert_index, dropped, num_experts)  # (M, E) each
        for layer, routed, lost in zip(layers, routed_all.tolist(), lost_all.tolist()):
            children = self._expert_children(layer, modality, num_experts)
            for (routed_child, dropped_child), n_routed, n_lost in zip(children, routed, lost):
                if n_routed:
                    routed_child.inc(n_routed)
                if n_lost:
                    dropped_child.inc(n_lost)

    def _expert_children(self, layer: int, modality: str, num_experts: int) -> list[tuple]:
        """The (routed, dropped) counters of each expert of a layer and modality, looked up once
        (the batchers count every forward pass)."""
        key = (layer, modality, num_experts)
        if key not in self._children:
            labels = [(self.name, self.version, str(layer), modality, str(e)) for e in range(num_experts)]
            self._children[key] = [(self.server.expert_tokens.labels(*ls), self.server.expert_dropped.labels(*ls))
                                   for ls in labels]
        return self._children[key]
