"""Prometheus metrics of one server (prometheus-client), in a registry of its own so that several
apps in one process (tests, Ray replicas) never share counters."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)


class Metrics:
    """What `/metrics` reports. Gauges of the scheduler (queue, slots in use, steps/s, images/s
    over the last scrape interval) are read from the engine at scrape time."""

    def __init__(self, engine):
        self.engine = engine
        r = self.registry = CollectorRegistry()
        self.requests = Counter("lasad_requests", "Requests answered, by HTTP status", ["status"], registry=r)
        self.rejected = Counter("lasad_rejected", "Requests refused because the queue was full (429)", registry=r)
        self.cancelled = Counter("lasad_cancelled", "Requests cancelled (client gone or timed out)", registry=r)
        self.latency = Histogram("lasad_request_latency_seconds", "Request received to response ready",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.first_row = Histogram("lasad_time_to_first_row_seconds",
                                   "Request received to its first image row (streamed requests)",
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("lasad_queue_wait_seconds", "Request received to its first decode step",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Gauge("lasad_queue_images", "Images waiting for a slot", registry=r)
        self.active = Gauge("lasad_active_images", "Images in slots (being generated)", registry=r)
        self.slots = Gauge("lasad_slots", "Image slots of the engine", registry=r)
        self.steps = Gauge("lasad_steps_total", "Decode steps run since start", registry=r)
        self.images = Gauge("lasad_images_total", "Images generated since start", registry=r)
        self.steps_rate = Gauge("lasad_steps_per_second", "Decode steps per second since the last scrape", registry=r)
        self.images_rate = Gauge("lasad_images_per_second", "Images per second since the last scrape", registry=r)
        self.host_us = Gauge("lasad_host_us_per_step", "Host time of the loop per step (scheduling, bookkeeping), µs",
                             registry=r)
        # running totals, so a client can difference two scrapes: mean images per step, step time
        self.images_stepped = Gauge("lasad_images_stepped_total", "Sum over steps of the images in the step",
                                    registry=r)
        self.rows_stepped = Gauge("lasad_rows_stepped_total", "Sum over steps of the state rows in the step",
                                  registry=r)
        self.step_seconds = Gauge("lasad_step_seconds_total", "Wall time of the decode loop in steps", registry=r)
        self.host_seconds = Gauge("lasad_host_seconds_total", "Host time of the decode loop in steps (not waiting "
                                  "for the device)", registry=r)
        self._last = (time.perf_counter(), 0, 0)

    def scrape(self) -> bytes:
        s = self.engine.stats()
        now = time.perf_counter()
        t0, steps0, images0 = self._last
        dt = max(now - t0, 1e-9)
        self.queue.set(s["waiting"])
        self.active.set(s["active"])
        self.slots.set(self.engine.max_batch)
        self.steps.set(s["steps"])
        self.images.set(s["images"])
        self.steps_rate.set((s["steps"] - steps0) / dt)
        self.images_rate.set((s["images"] - images0) / dt)
        self.host_us.set(1e6 * s["host_seconds"] / s["steps"] if s["steps"] else 0.0)
        self.images_stepped.set(s["images_stepped"])
        self.rows_stepped.set(s["rows"])
        self.step_seconds.set(s["step_seconds"])
        self.host_seconds.set(s["host_seconds"])
        self._last = (now, s["steps"], s["images"])
        return generate_latest(self.registry)
