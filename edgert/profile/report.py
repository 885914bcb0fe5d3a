"""Profile an artifact on a device and write the report: JSON, CSV, and HTML with matplotlib plots.

Host side only (matplotlib); the measuring itself runs on the device (`edgert.profile.measure`).
"""

from __future__ import annotations

import csv
import html
import json
from pathlib import Path
from typing import Any


def report_title(result: dict[str, Any]) -> str:
    """'edgert profile: MODEL on DEVICE', marked emulated where the device is the emulated board."""
    device = result["device"]
    title = f"edgert profile: {result['model']} on {device['name']}"
    if device.get("emulated"):
        title += " [emulated: qemu timings, not ARM hardware timings]"
    gpu = result.get("gpu")
    if gpu is not None:
        title += f" (OpenCL: {gpu['device']['name']})"
        if gpu["device"].get("cpu_emulation"):
            title += " [CPU emulation of OpenCL: not a GPU's timings]"
    return title


def gpu_summary(gpu: dict[str, Any], top: int = 10) -> list[str]:
    """The GPU part of a profile as text lines: the caveat, kernels by device time with their share, memory."""
    mem = gpu["memory"]
    mb = 1 / 2**20
    lines = [f"note: {gpu['note']}"] if gpu.get("note") else []
    lines.append(
        f"OpenCL kernels over {gpu['window']}: {gpu['launches']} launches, {gpu['kernel_ms']:.3f} ms of device time "
        f"in {gpu['wall_ms']:.3f} ms wall time ({gpu['device']['name']}, {gpu['device']['type']})"
    )
    lines.append(f"{'kernel':52} {'count':>6} {'total ms':>10} {'mean us':>10} {'share':>7}  global / local")
    for k in gpu["kernels"][:top]:
        lines.append(
            f"{k['kernel'][:52]:52} {k['count']:6d} {k['total_ms']:10.3f} {k['mean_us']:10.2f} "
            f"{k['share'] * 100:6.1f}%  {k['global']} / {k['local']}"
        )
    if len(gpu["kernels"]) > top:
        rest = gpu["kernels"][top:]
        lines.append(f"... {len(rest)} more kernels, {sum(k['share'] for k in rest) * 100:.1f}% of the time")
    lines.append(
        f"device memory: peak {mem['peak_bytes'] * mb:.2f} MiB, resident {mem['resident_bytes'] * mb:.2f} MiB "
        f"(weights {mem['weights_bytes'] * mb:.2f} MiB), {mem['allocations']} allocations"
    )
    return lines


def write_report(result: dict[str, Any], report: Path) -> dict[str, Path]:
    """Write ``report`` (HTML) with its plots, and the JSON and CSV beside it; their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = {**result, "title": report_title(result)}
    stem = report.with_suffix("")
    paths = {
        "html": report,
        "json": Path(f"{stem}.json"),
        "csv": Path(f"{stem}.csv"),
        "timeline": Path(f"{stem}.timeline.png"),
        "histogram": Path(f"{stem}.histogram.png"),
        "operators": Path(f"{stem}.operators.png"),
    }
    if result.get("gpu"):
        paths["gpu_kernels"] = Path(f"{stem}.gpu_kernels.png")
    paths["json"].write_text(json.dumps(result, indent=1))
    if result.get("kind") == "graph":
        return _write_graph_report(result, paths, plt)
    with paths["csv"].open("w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["kind", "run", "step_or_operator", "ms", "calls_per_token"])
        for run, steps in enumerate(result["decode_step_ms"]):
            out.writerows(["decode_token", run, i, ms, ""] for i, ms in enumerate(steps))
        for op in result["operators"]:
            out.writerow(["operator", "", op["operator"], op["ms_per_token"], op["calls_per_token"]])
        for k in (result.get("gpu") or {}).get("kernels", []):  # device ms over the whole window, launches
            out.writerow(["gpu_kernel", "", k["kernel"], k["total_ms"], k["count"]])

    device = f"{result['device']['name']} via {result['link']['kind']}"
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for run, steps in enumerate(result["decode_step_ms"]):
        ax.plot(range(1, len(steps) + 1), steps, marker=".", label=f"run {run + 1}")
    ax.set(xlabel="generated token", ylabel="decode step (ms)", title=f"Per-token decode latency: {device}")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(paths["timeline"], dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    every = [ms for steps in result["decode_step_ms"] for ms in steps]
    ax.hist(every, bins=min(30, max(5, len(every) // 3)))
    for key, style in (("p50", "-"), ("p90", "--"), ("p99", ":")):
        ax.axvline(result["decode_ms"][key], color="k", linestyle=style, label=f"{key} {result['decode_ms'][key]} ms")
    ax.set(xlabel="decode step (ms)", ylabel="tokens", title="Decode latency histogram")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(paths["histogram"], dpi=90)
    plt.close(fig)

    _top_operators_plot(plt, result["operators"], "ms_per_token", "ms per token (decode)", "operators", paths)

    if "gpu_kernels" in paths:
        gpu = result["gpu"]
        top = gpu["kernels"][:15][::-1]
        fig, ax = plt.subplots(figsize=(8, 0.35 * len(top) + 1.4))
        ax.barh([k["kernel"][:48] for k in top], [k["total_ms"] for k in top])
        title = f"OpenCL kernels, device time over {gpu['window']}"
        if gpu["device"].get("cpu_emulation"):
            title += "\n(CPU emulation of OpenCL: not a GPU's timings)"
        ax.set(xlabel="device time (ms, OpenCL events)", title=title)
        ax.tick_params(axis="y", labelsize=7)
        fig.tight_layout()
        fig.savefig(paths["gpu_kernels"], dpi=90)
        plt.close(fig)

    paths["html"].write_text(_html(result, paths))
    return paths


def graph_summary(result: dict[str, Any], top: int = 12) -> list[str]:
    """A graph profile as text lines: call latency, then its kernels by time per run with their share."""
    c = result["call_ms"]
    shapes = ", ".join(f"{k} {v['dtype']}{v['shape']}" for k, v in result["inputs"].items())
    lines = [
        f"{result['runs']} calls on {shapes}, {result['threads']} threads: p50 {c['p50']} ms, p90 {c['p90']} ms, "
        f"min {c['min']} ms",
        f"{'kernel':56} {'calls':>6} {'ms/run':>9} {'share':>7}",
    ]
    for op in result["operators"][:top]:
        lines.append(
            f"{op['operator'][:56]:56} {op['calls_per_run']:6g} {op['ms_per_run']:9.4f} {op['share'] * 100:6.1f}%"
        )
    if len(result["operators"]) > top:
        rest = result["operators"][top:]
        lines.append(f"... {len(rest)} more, {sum(op['share'] for op in rest) * 100:.1f}% of the time")
    return lines


def _top_operators_plot(
    plt: Any, operators: list[dict[str, Any]], key: str, xlabel: str, what: str, paths: dict[str, Path]
) -> None:
    """The 15 costliest operators by ``key`` as horizontal bars, into ``paths["operators"]``."""
    top = operators[:15][::-1]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(top) + 1.2))
    ax.barh([op["operator"][:48] for op in top], [op[key] for op in top])
    ax.set(xlabel=xlabel, title=f"Top {what} (Relax VM instrument)")
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(paths["operators"], dpi=90)
    plt.close(fig)


def _write_graph_report(result: dict[str, Any], paths: dict[str, Path], plt: Any) -> dict[str, Path]:
    """A graph artifact's report: call latencies (timeline, histogram) and its kernels, no decode."""
    with paths["csv"].open("w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["kind", "run", "call_or_operator", "ms", "calls_per_run"])
        out.writerows(["call", i, "", ms, ""] for i, ms in enumerate(result["call_run_ms"]))
        for op in result["operators"]:
            out.writerow(["operator", "", op["operator"], op["ms_per_run"], op["calls_per_run"]])
    device = f"{result['device']['name']} via {result['link']['kind']}"
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(range(1, len(result["call_run_ms"]) + 1), result["call_run_ms"], marker=".")
    ax.set(xlabel="call", ylabel="latency (ms)", title=f"Graph call latency: {device}")
    fig.tight_layout()
    fig.savefig(paths["timeline"], dpi=90)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(result["call_run_ms"], bins=min(30, max(5, len(result["call_run_ms"]) // 3)))
    ax.set(xlabel="call latency (ms)", ylabel="calls", title="Call latency histogram")
    fig.tight_layout()
    fig.savefig(paths["histogram"], dpi=90)
    plt.close(fig)
    _top_operators_plot(plt, result["operators"], "ms_per_run", "ms per call", "kernels", paths)
    e, t, c = html.escape, result["target"], result["call_ms"]
    rows = [
        ("device", f"{result['device']['name']} ({result['device']['arch']}, {result['device']['cpus']} CPUs)"),
        ("target", f"{t['name']}: {t['arch']} cpu={t['cpu']} flags={','.join(t['cpu_flags'])}"),
        ("link", f"{result['link']['kind']} ({result['link']['uri']})"),
        ("artifact", result["artifact"]),
        ("threads", str(result["threads"])),
        ("inputs", ", ".join(f"{k} {v['dtype']}{v['shape']}" for k, v in result["inputs"].items())),
        ("load time", f"{result['load_seconds']:.3f} s"),
        ("call", f"p50 {c['p50']} ms, p90 {c['p90']} ms, p99 {c['p99']} ms, min {c['min']} ms, {result['runs']} calls"),
        ("peak memory (max RSS)", f"{result['peak_rss_mb']} MB"),
    ]
    ops = "\n".join(
        f"<tr><td>{e(o['operator'])}</td><td>{o['ms_per_run']}</td><td>{o['calls_per_run']}</td>"
        f"<td>{o['share'] * 100:.1f}%</td></tr>"
        for o in result["operators"]
    )
    columns = ("kernel", "ms/call", "calls", "share")
    paths["html"].write_text(_html_page(result["title"], rows, paths, "Kernels (per call)", columns, ops))
    return paths


def _html(result: dict[str, Any], paths: dict[str, Path]) -> str:
    e = html.escape
    t, d, p = result["target"], result["decode_ms"], result["prefill_ms"]
    emulated = "yes: timings come from qemu-user, not from ARM hardware" if result["device"]["emulated"] else "no"
    counts = f"{result['prompt_tokens']} / {result['max_tokens']} / {result['runs']}"
    rows = [
        ("device", f"{result['device']['name']} ({result['device']['arch']}, {result['device']['cpus']} CPUs)"),
        ("emulated", emulated),
        ("target", f"{t['name']}: {t['arch']} {t.get('triple', '')} cpu={t['cpu']} flags={','.join(t['cpu_flags'])}"),
        ("link", f"{result['link']['kind']} ({result['link']['uri']})"),
        ("artifact", result["artifact"]),
        ("threads", str(result["threads"])),
        ("prompt tokens / decode steps / runs", counts),
        ("load time", f"{result['load_seconds']:.3f} s"),
        ("prefill", f"p50 {p['p50']} ms, p90 {p['p90']} ms ({result['prefill_tokens_per_second']} tokens/s)"),
        ("decode per token", f"p50 {d['p50']} ms, p90 {d['p90']} ms, p99 {d['p99']} ms, mean {d['mean']} ms"),
        ("decode tokens/s (p50)", str(result["decode_tokens_per_second"])),
        ("peak memory (max RSS)", f"{result['peak_rss_mb']} MB"),
    ]
    ops = "\n".join(
        f"<tr><td>{e(o['operator'])}</td><td>{o['ms_per_token']}</td><td>{o['calls_per_token']}</td>"
        f"<td>{o['share'] * 100:.1f}%</td></tr>"
        for o in result["operators"][:30]
    )
    columns = ("operator", "ms/token", "calls/token", "share")
    gpu = _gpu_html(result.get("gpu")) + "\n"
    return _html_page(result["title"], rows, paths, "Operators (decode, per token)", columns, ops, gpu)


def _html_page(
    title: str,
    rows: list[tuple[str, str]],
    paths: dict[str, Path],
    heading: str,
    columns: tuple[str, ...],
    ops: str,
    extra: str = "",
) -> str:
    """A profile report's page: the facts table, the plots written beside it, the operator table,
    ``extra`` sections, and links to the data files."""
    e = html.escape
    table = "\n".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in rows)
    data = " ".join(f'<a href="{e(paths[k].name)}">{e(paths[k].name)}</a>' for k in ("json", "csv"))
    plots = ("timeline", "histogram", "operators", "gpu_kernels")
    img = "\n".join(f'<p><img src="{e(paths[k].name)}" alt="{k}"></p>' for k in plots if k in paths)
    header = "".join(f"<th>{c}</th>" for c in columns)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{e(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}} th{{text-align:left;padding-right:1em}} td{{padding-right:1em}}</style>
</head><body>
<h1>{e(title)}</h1>
<table>{table}</table>
<h2>Plots</h2>
{img}
<h2>{heading}</h2>
<table><tr>{header}</tr>
{ops}</table>
{extra}<p>Data: {data}</p>
</body></html>
"""


def _gpu_html(gpu: dict[str, Any] | None) -> str:
    """The OpenCL section: device, caveat, kernels by device time, device memory."""
    if not gpu:
        return ""
    e = html.escape
    d, mem, mib = gpu["device"], gpu["memory"], 1 / 2**20
    note = f"<p><strong>Note:</strong> {e(gpu['note'])}</p>" if gpu.get("note") else ""
    rows = "\n".join(
        f"<tr><td>{e(k['kernel'])}</td><td>{k['count']}</td><td>{k['total_ms']}</td><td>{k['mean_us']}</td>"
        f"<td>{k['share'] * 100:.1f}%</td><td>{e(k['global'])}</td><td>{e(k['local'])}</td></tr>"
        for k in gpu["kernels"]
    )
    return f"""<h2>OpenCL kernels (device time from OpenCL events)</h2>
<p>{e(d["name"])} ({e(d["platform"])}, {e(d["type"])}, {e(d["version"])}); {e(gpu["window"])}: {gpu["launches"]}
launches, {gpu["kernel_ms"]} ms of kernel time in {gpu["wall_ms"]} ms wall time.</p>
{note}
<p>Device memory: peak {mem["peak_bytes"] * mib:.2f} MiB, resident {mem["resident_bytes"] * mib:.2f} MiB
(weights {mem["weights_bytes"] * mib:.2f} MiB), {mem["allocations"]} allocations.</p>
<table><tr><th>kernel</th><th>count</th><th>total ms</th><th>mean µs</th><th>share</th><th>global</th>
<th>local</th></tr>
{rows}</table>
"""


# -- fleet ----------------------------------------------------------------------------------------

# (metric, label, unit): a language model's profile has the decode and prefill times, a graph's its
# call times; a metric goes into the summary where every device's profile has it.
FLEET_METRICS: tuple[tuple[str, str, str], ...] = (
    ("decode_ms", "decode per token", "ms"),
    ("prefill_ms", "prefill", "ms"),
    ("call_ms", "graph call", "ms"),
    ("load_seconds", "load", "s"),
    ("peak_rss_mb", "peak memory (max RSS)", "MB"),
)


def _median_p90(result: dict[str, Any], metric: str) -> tuple[float, float | None]:
    value = result[metric]
    if isinstance(value, dict):
        return float(value["p50"]), float(value["p90"])
    return float(value), None  # one figure per device: its median is itself, it has no p90


def fleet_summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per metric: each device's median and p90, and the spread of the medians across devices
    (min, max, max/min and the coefficient of variation)."""
    import numpy as np

    out: dict[str, Any] = {}
    for metric, label, unit in FLEET_METRICS:
        if results and any(metric not in r for r in results):
            continue
        rows = []
        for r in results:
            median, p90 = _median_p90(r, metric)
            rows.append({"device": r["device"]["name"], "lease": r["link"]["uri"], "median": median, "p90": p90})
        medians = np.array([row["median"] for row in rows], dtype=float)
        spread: dict[str, float | None] = {"min": None, "max": None, "max_over_min": None, "cv": None}
        if len(medians):
            spread = {
                "min": round(float(medians.min()), 3),
                "max": round(float(medians.max()), 3),
                "max_over_min": round(float(medians.max() / medians.min()), 3) if medians.min() > 0 else None,
                "cv": round(float(medians.std() / medians.mean()), 4) if medians.mean() > 0 else None,
            }
        out[metric] = {"label": label, "unit": unit, "devices": rows, "spread": spread}
    return out


def fleet_headlines(doc: dict[str, Any]) -> list[str]:
    """A fleet report's headline per device and the spread: a language model's decode step, a
    graph's (no decode) call."""
    summary = doc["summary"]
    metric, what, per = ("decode_ms", "decode", " per token") if "decode_ms" in summary else ("call_ms", "call", "")
    lines = [
        f"{row['device']}: {what} p50 {row['median']:.2f} ms, p90 {row['p90']:.2f} ms{per}"
        for row in summary[metric]["devices"]
    ]
    spread = summary[metric]["spread"]
    if spread["max_over_min"] is not None:
        lines.append(f"spread of {what} medians across devices: max/min {spread['max_over_min']}, cv {spread['cv']}")
    return lines


def write_fleet_report(
    results: list[dict[str, Any]], failures: list[dict[str, Any]], report: Path, about: dict[str, Any]
) -> dict[str, Path]:
    """One report for a fleet: per-device medians and p90s, the spread, a plot per metric with a row per
    device, and the devices that failed with the reason; JSON and CSV beside the HTML."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = fleet_summary(results)
    stem = report.with_suffix("")
    paths = {"html": report, "json": Path(f"{stem}.json"), "csv": Path(f"{stem}.csv")}
    emulated = any(r["device"].get("emulated") for r in results)
    model = results[0]["model"] if results else about["artifact"]
    title = (
        f"edgert fleet profile: {model} on {len(results)} of {len(results) + len(failures)} '{about['key']}' devices"
    )
    if emulated:
        title += " [emulated: qemu timings, not ARM hardware timings]"
    doc = {"title": title, **about, "summary": summary, "failures": failures, "devices": results}
    paths["json"].write_text(json.dumps(doc, indent=1))
    with paths["csv"].open("w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["metric", "unit", "device", "lease", "median", "p90"])
        for metric, m in summary.items():
            out.writerows([metric, m["unit"], d["device"], d["lease"], d["median"], d["p90"]] for d in m["devices"])
        out.writerows(["failed", "", f["device"], f["lease"], "", f["error"]] for f in failures)

    for metric, m in summary.items():
        if not m["devices"]:
            continue
        paths[metric] = Path(f"{stem}.{metric}.png")
        rows = m["devices"]
        fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.3))
        labels = [f"{d['device'][:40]} ({d['lease'].split(' ')[0]})" for d in rows]
        ax.barh(labels, [d["median"] for d in rows], color="tab:blue", label="median")
        p90 = [(i, d["p90"]) for i, d in enumerate(rows) if d["p90"] is not None]
        if p90:
            ax.plot([v for _, v in p90], [i for i, _ in p90], "k|", markersize=14, label="p90")
        ax.invert_yaxis()
        ax.set(xlabel=f"{m['label']} ({m['unit']})", title=f"{m['label']}: one row per device")
        ax.tick_params(axis="y", labelsize=7)
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(paths[metric], dpi=90)
        plt.close(fig)
    paths["html"].write_text(_fleet_html(doc, paths))
    return paths


def _fleet_html(doc: dict[str, Any], paths: dict[str, Path]) -> str:
    e = html.escape

    def num(v: float | None) -> str:
        return "" if v is None else f"{v:g}"

    sections = []
    for metric, m in doc["summary"].items():
        s = m["spread"]
        rows = "\n".join(
            f"<tr><td>{e(d['device'])}</td><td>{e(d['lease'])}</td><td>{num(d['median'])}</td><td>{num(d['p90'])}</td></tr>"
            for d in m["devices"]
        )
        img = f'<p><img src="{e(paths[metric].name)}" alt="{e(metric)}"></p>' if metric in paths else ""
        sections.append(
            f"<h2>{e(m['label'])} ({e(m['unit'])})</h2>\n<p>spread of the medians across devices: min {num(s['min'])}, "
            f"max {num(s['max'])}, max/min {num(s['max_over_min'])}, coefficient of variation {num(s['cv'])}</p>\n"
            f"<table><tr><th>device</th><th>lease</th><th>median</th><th>p90</th></tr>\n{rows}</table>\n{img}"
        )
    if doc["failures"]:
        fails = "\n".join(
            f"<tr><td>{e(f['device'])}</td><td>{e(f['lease'])}</td><td>{e(f['kind'])}</td><td>{e(f['error'])}</td></tr>"
            for f in doc["failures"]
        )
        head = "<tr><th>device</th><th>lease</th><th>kind</th><th>reason</th></tr>"
        failed = f"<h2>Failed devices</h2>\n<table>{head}\n{fails}</table>"
    else:
        failed = "<h2>Failed devices</h2>\n<p>none</p>"
    data = " ".join(f'<a href="{e(paths[k].name)}">{e(paths[k].name)}</a>' for k in ("json", "csv"))
    body = "\n".join(sections)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{e(doc["title"])}</title>
<style>body{{font-family:sans-serif;margin:2em}} th{{text-align:left;padding-right:1em}} td{{padding-right:1em}}</style>
</head><body>
<h1>{e(doc["title"])}</h1>
<p>tracker {e(doc["tracker"])}, key {e(doc["key"])}, artifact {e(doc["artifact"])}</p>
{failed}
{body}
<p>Data: {data}</p>
</body></html>
"""
