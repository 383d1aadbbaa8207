"""The HTTP server (SPEC §6), in the order a request meets it: app (routes, limits, errors, health, the
request log), requests (the request models and their validation), admission (shape checks, tokenizing,
queueing within a caller's share, cancelling), scheduler (the engines' threads: continuous slots or static
batches, over mtj.decode), completions (the endpoints' responses and the stream)."""

from mtj.serve.app import Server, request_log

__all__ = ["Server", "request_log"]
