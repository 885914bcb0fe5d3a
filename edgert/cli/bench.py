"""`edgert bench`: load time, prefill and decode speed, peak memory (`edgert.profile.bench_generator`)."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from edgert.cli.common import AllowUnsignedOpt, ArtifactArg, JsonOpt, ThreadsOpt, out


def bench(
    artifact: ArtifactArg,
    prompt_tokens: Annotated[int, typer.Option("--prompt-tokens", help="Prefill length.")] = 128,
    gen_tokens: Annotated[int, typer.Option("--gen-tokens", help="Decode steps per run.")] = 64,
    repeats: Annotated[int, typer.Option("--repeats", "-r", help="Runs; medians are reported.")] = 5,
    threads: ThreadsOpt = None,
    background: Annotated[
        int,
        typer.Option(
            "--background", help="Busy processes spinning beside the run (a phone's other work); ended after it."
        ),
    ] = 0,
    verify_rows: Annotated[
        int,
        typer.Option(
            "--verify-rows",
            help="Instead: time a verify pass over N tokens against one decode step (--repeats rounds, "
            "default 30) and print the ratio, what a speculative round of N - 1 drafts costs in steps.",
        ),
    ] = 0,
    operators: Annotated[
        bool,
        typer.Option(
            "--operators", help="With --verify-rows: each VM call's CPU time in a decode step and a verify pass."
        ),
    ] = False,
    as_json: JsonOpt = False,
    unsigned: AllowUnsignedOpt = False,
) -> None:
    """Measure load time, prefill and decode tokens/s (medians) and peak memory."""
    from edgert.profile import bench_generator, bench_verify

    if verify_rows:
        result = bench_verify(artifact, verify_rows, repeats if repeats != 5 else 30, threads, prompt_tokens, operators)
        if as_json:
            print(json.dumps(result, indent=2))
            return
        if operators:
            table = Table("operator", "decode ms", "verify ms", "calls (decode / verify)")
            for row in result["operators"][:20]:
                calls = f"{row['decode_calls']:g} / {row['verify_calls']:g}"
                table.add_row(row["operator"], f"{row['decode_ms']:.3f}", f"{row['verify_ms']:.3f}", calls)
            out.print(table)
        out.print(
            f"verify of {verify_rows} tokens {result['verify_ms_min']} ms, decode step {result['decode_ms_min']} ms "
            f"(minimums of {result['rounds']} rounds): {result['verify_over_decode']} decode steps "
            f"(medians: {result['verify_over_decode_median']})"
            + (
                f"; in CPU time (medians): {result['cpu_verify_over_decode']}"
                if "cpu_verify_over_decode" in result
                else ""
            )
        )
        return
    result = bench_generator(artifact, prompt_tokens, gen_tokens, repeats, threads, background)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    table = Table("metric", "value")
    for key in ("target", "threads", "load_seconds", "prefill_tokens_per_second", "decode_tokens_per_second",
                "peak_rss_mb"):  # fmt: skip
        table.add_row(key, str(result[key]))
    if "background" in result:
        bg = result["background"]
        table.add_row("background", f"{bg['processes']} busy processes ({bg['cpu_seconds']} CPU s)")
    out.print(table)
