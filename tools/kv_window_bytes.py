"""KV bytes in use of a language model after 512, 2,000 and 4,000 prompt tokens (pages in use x
page bytes, per cache), and its greedy tokens after a 1,000-token prompt, as JSON.

    python tools/kv_window_bytes.py g.edgert [--free-window]

Compile with `--context 4096` for the 4,000 tokens. ``--free-window`` frees a Gemma 3 model's
sliding-window layers' keys and values outside the window (`Generator(free_window=True)`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgert.profile.bench import BENCH_TEXT  # noqa: E402
from edgert.runtime import open_artifact  # noqa: E402
from edgert.runtime.generator import Generator  # noqa: E402

LENGTHS = (512, 2000, 4000)


def rss_mib() -> int:
    """Resident memory of this process now (VmRSS), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    return -1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--free-window", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    art = open_artifact(args.artifact)
    kv = art.manifest["kv_cache"]
    local = kv.get("local")
    page_bytes = 2 * kv["num_kv_heads"] * kv["page_size"] * kv["head_dim"] * 4  # f32 K and V, one layer
    layers = [kv["num_layers"]] if local is None else [kv["num_layers"] - local["num_layers"], local["num_layers"]]
    model = Generator(art, threads=args.threads, free_window=args.free_window)
    ids = model.tokenizer.encode(" ".join([BENCH_TEXT] * 80))[: max(LENGTHS)]
    out: dict = {"artifact": str(args.artifact), "free_window": args.free_window}
    for n in LENGTHS:
        model.prefill(ids[:n])
        pages = model.cache.pages_in_use()
        kv_bytes = sum(p * n_layers * page_bytes for p, n_layers in zip(pages, layers, strict=True))
        out[str(n)] = {"pages": pages, "kv_mib": round(kv_bytes / 2**20, 2), "rss_mib": rss_mib()}
        print(n, out[str(n)], file=sys.stderr, flush=True)
    out["greedy_after_1000"] = [t.id for t in model.generate(ids[:1000], max_tokens=24)]
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
