"""Observability shared by the three services: request ids in logs, Prometheus metrics.

- `logs`: `--log-level` / `--log-format text|json`, and the request id on every log record
  (a context variable, set by the gateway per HTTP request and by workers per gRPC call).
- `request_id`: what a valid id is, how it travels (gRPC metadata, the ids on the wire).
- `http`: the gateway's middleware: X-Request-Id in and out, request counts and latencies.
- `request_metrics`: the gateway's request histograms (TTFT, TPOT, ITL, E2E).
- `worker_metrics`: a worker's metrics (KV pool, engine steps, KV transfer, process).
- `metrics_server`: a worker's /metrics over HTTP on `--metrics-port`.
- `endpoints`: workers announce their /metrics address in Redis for `kvrelay status`.
"""
