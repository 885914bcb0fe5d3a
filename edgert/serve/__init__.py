"""`edgert serve`: compiled artifacts behind an OpenAI-compatible HTTP API (runtime side only).

`engine` batches a language model's requests over one paged KV cache with prefix caching,
`models` loads each artifact for its endpoint, `app` is the Starlette app, `metrics` the
Prometheus text.
"""
