"""/metrics in Prometheus' text format (version 0.0.4), written out directly: a few counters and
gauges do not need a client library."""

from __future__ import annotations

from collections import Counter
from typing import Any


def _labels(**labels: str) -> str:
    inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return "{" + inner + "}" if inner else ""


def render_metrics(models: dict[str, Any], counts: Counter) -> str:
    """Requests by path and status, then per language model: queue, sequences, KV pages, tokens, TTFT."""
    lines: list[str] = []

    def family(name: str, kind: str, help_: str) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")

    family("edgert_requests_total", "counter", "HTTP requests answered, by path and status.")
    for (path, status), n in sorted(counts.items()):
        lines.append(f"edgert_requests_total{_labels(path=path, status=status)} {n}")

    engines = {name: m.runtime for name, m in models.items() if m.kind == "completion"}
    gauges = {name: e.snapshot() for name, e in engines.items()}
    for key, kind, help_ in (
        ("queue_length", "gauge", "Requests waiting for a batch slot."),
        ("active_sequences", "gauge", "Sequences in the running batch."),
        ("kv_pages_in_use", "gauge", "KV cache pages held (running sequences and cached prefixes)."),
        ("kv_pages_total", "gauge", "KV cache pages in all."),
        ("prefix_cache_entries", "gauge", "Cached prompt prefixes."),
        ("prefix_cache_tokens", "gauge", "Tokens of KV held by cached prefixes."),
        ("prefix_cache_pages", "gauge", "KV pages held by cached prefixes (shared pages counted per prefix)."),
        ("tokens_per_second", "gauge", "Generated tokens per second over the last 10 s."),
    ):
        family(f"edgert_{key}", kind, help_)
        for name, g in gauges.items():
            lines.append(f"edgert_{key}{_labels(model=name)} {g[key]:g}")
    for key, help_ in (
        ("generated_tokens", "Tokens generated."),
        ("prompt_tokens", "Prompt tokens received."),
        ("prefill_tokens", "Prompt tokens run through the model (the rest came from the prefix cache)."),
        ("prefix_hit_tokens", "Prompt tokens served from the prefix cache."),
        ("decode_steps", "Batched decode passes."),
        ("prefill_passes", "Prefill passes (one may take the prompts of several requests)."),
        ("decode_rows", "Sequences decoded, summed over passes (over decode_steps: the mean batch)."),
        ("finished", "Requests that ran to their end."),
        ("cancelled", "Requests dropped because their client went away."),
        ("evicted_tokens", "KV entries dropped by the --kv-budget (TOVA)."),
        ("evictions", "Sequences rebuilt with fewer entries by the --kv-budget."),
    ):
        family(f"edgert_{key}_total", "counter", help_)
        for name, e in engines.items():
            lines.append(f"edgert_{key}_total{_labels(model=name)} {getattr(e.counters, key)}")
    family("edgert_scheduler_seconds_total", "counter", "The scheduler thread's time by phase.")
    for name, e in engines.items():
        for phase, seconds in e.counters.phase_seconds.items():
            lines.append(f"edgert_scheduler_seconds_total{_labels(model=name, phase=phase)} {seconds:.6f}")
    for i, (metric, help_, fmt) in enumerate(
        (
            ("passes", "Model passes by kind and decoding rows in the pass.", "g"),
            ("pass_seconds", "Seconds in model passes by kind and decoding rows.", ".6f"),
            ("pass_tokens", "Tokens run in model passes by kind and decoding rows.", "g"),
        )
    ):  # each pass counter holds (passes, seconds, tokens)
        family(f"edgert_model_{metric}_total", "counter", help_)
        for name, e in engines.items():
            for key, values in sorted(e.counters.passes.items()):
                kind, rows = key.split("/")
                labels = _labels(model=name, kind=kind, rows=rows)
                lines.append(f"edgert_model_{metric}_total{labels} {values[i]:{fmt}}")
    family("edgert_time_to_first_token_seconds", "histogram", "Time from a request's arrival to its first token.")
    for name, e in engines.items():
        c = e.counters
        for bound, n in c.ttft_buckets.items():
            lines.append(f"edgert_time_to_first_token_seconds_bucket{_labels(model=name, le=f'{bound:g}')} {n}")
        lines.append(f"edgert_time_to_first_token_seconds_bucket{_labels(model=name, le='+Inf')} {c.ttft_count}")
        lines.append(f"edgert_time_to_first_token_seconds_sum{_labels(model=name)} {c.ttft_sum:.6f}")
        lines.append(f"edgert_time_to_first_token_seconds_count{_labels(model=name)} {c.ttft_count}")
    return "\n".join(lines) + "\n"
