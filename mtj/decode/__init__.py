"""Decoding, apart from serving: `sampling` (per-row values, filtering, sampling), `generator` (the batch loop
of generate_tokens: prefill, then while-loop decode phases over a growing cache), `layout` (the weights as
decoding reads them), `slots` (the continuous engine's pure verbs: init, prefill, insert, decode), `cpu` (the
XLA:CPU kernels: blocked argmax, the bf16 head screen), `stops` (when a row ends and what its text is)."""
