"""`ffclip serve`: edits over HTTP on Ray Serve, with batching across requests, replicas, back-pressure, Prometheus
metrics and a small web editor.

`requests` checks what clients send, `editor` runs batches of edits on one set of stages, `metrics` counts what the
service does, and `app` puts these on Ray Serve. Only `app` imports Ray (the `ffclip[serve]` extra).
"""
