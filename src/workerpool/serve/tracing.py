"""OpenTelemetry tracing (``--tracing``, ``[server] tracing = true``; the ``otel`` extra): a
span per request, HTTP or gRPC, with two children the pool timed: the wait in its queue and
the compute in the worker.

    POST /v2/models/{m}/infer   (kind SERVER; a W3C traceparent from the client is its parent)
      ├─ queue     enqueued in the pool -> sent to a worker
      └─ compute   the worker's predict (as the worker measured it), ending at the answer

Attributes: http.request.method, url.path, http.response.status_code (gRPC: rpc.method,
rpc.grpc.status_code), workerpool.model, workerpool.model_version, workerpool.protocol,
workerpool.request_id. Spans go to the tracer provider the environment set up (e.g.
``opentelemetry-instrument workerpool serve ...``); when none is, the server sets one up
exporting OTLP over HTTP (OTEL_EXPORTER_OTLP_ENDPOINT and the other OTEL_* variables apply).
With ``--http-workers``, a front end makes the request's span and the server's process its
children, under the context the front end passes on. Without ``--tracing`` nothing here runs.
"""

from __future__ import annotations

import contextlib
import time

from .. import request_ids


class Tracing:
    def __init__(self):
        from opentelemetry import propagate, trace

        self._trace = trace
        self._propagate = propagate
        self.tracer = trace.get_tracer("workerpool")
        self.provider = None  # the one set up here, to flush at exit

    @classmethod
    def start(cls) -> "Tracing":
        """Tracing on the environment's tracer provider, or on an OTLP exporter set up
        here; ImportError (saying what to install) without the otel extra."""
        try:
            from opentelemetry import trace
        except ImportError:
            raise ImportError("--tracing needs OpenTelemetry: pip install "
                              "'workerpool-serve[otel]' (in a clone: pip install '.[otel]')") \
                from None
        tracing = cls()
        if type(trace.get_tracer_provider()).__name__ == "ProxyTracerProvider":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            provider = TracerProvider(resource=Resource.create(
                {"service.name": "workerpool-serve"}))
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
            trace.set_tracer_provider(provider)
            tracing.provider = provider
            tracing.tracer = trace.get_tracer("workerpool")
        return tracing

    def shutdown(self) -> None:
        """Export what is buffered (at the server's exit)."""
        if self.provider is not None:
            self.provider.shutdown()

    def extract(self, carrier: dict):
        """The trace context a client sent (traceparent, tracestate), or None."""
        return self._propagate.extract(carrier)

    def inject(self) -> dict:
        """The current span's context as headers, for the server's process."""
        carrier: dict = {}
        self._propagate.inject(carrier)
        return carrier

    @contextlib.contextmanager
    def request(self, name: str, carrier: dict, attributes: dict):
        """The span of one request (the pool's times become its children); yields it."""
        timings: dict = {}
        token = request_ids.timings.set(timings)
        try:
            with self.tracer.start_as_current_span(
                    name, context=self.extract(carrier), kind=self._trace.SpanKind.SERVER,
                    attributes=attributes) as span:
                try:
                    yield span
                finally:
                    served = request_ids.served.get()
                    if served:
                        span.set_attributes({"workerpool.model": served[0],
                                             "workerpool.model_version": served[1],
                                             "workerpool.protocol": served[2]})
                    self.children(timings)
        finally:
            request_ids.timings.reset(token)

    @contextlib.contextmanager
    def pool_times(self, carrier: dict | None):
        """The queue and compute children of a request whose span is another process's
        (a front end's), under the context it passed."""
        timings: dict = {}
        token = request_ids.timings.set(timings)
        try:
            yield
        finally:
            request_ids.timings.reset(token)
            if carrier:
                self.children(timings, self.extract(carrier))

    def children(self, timings: dict, context=None) -> None:
        """The queue and compute spans of the pool's ``timings`` (monotonic seconds)."""
        if "sent" not in timings:
            return
        offset = time.time_ns() - time.monotonic_ns()  # monotonic -> epoch ns

        def at(seconds: float) -> int:
            return int(seconds * 1e9) + offset

        self.tracer.start_span("queue", context=context, start_time=at(timings["enqueued"]),
                               ).end(end_time=at(timings["sent"]))
        if "answered" in timings:
            compute = timings.get("compute_s") or 0.0
            end = timings["answered"]
            start = max(timings["sent"], end - compute)
            self.tracer.start_span("compute", context=context, start_time=at(start),
                                   attributes={"workerpool.compute_s": compute},
                                   ).end(end_time=at(end))
