"""Replay Whisper lookup drafting offline on the bench's decodes: rounds, accepted drafts and a cost bound.

    python tools/whisper_draft_replay.py w.edgert [--costs 1.03,1.22,1.37,1.51,1.67,1.83,1.99,2.15,2.29]

Greedy decoding fixes every decode's tokens, so any draft policy's rounds replay exactly once the
bench's decodes (`tools/peers/speculative_whisper.py`: long-form and streaming, each decode's
prompt, draft reference and tokens) are recorded from one plain run. Each round is costed at
``--costs`` (a verify pass of 1, 2, ... rows in decode steps, `tools/whisper_verify_cost.py`;
linear past the last), a plain step at 1; the ratio is plain decoder steps over that cost, after
each window's prompt (its prefill is left out, so the bench's ratios come out lower). Prints the
ratio for k = 4, 6, 8 and with and without the first drafts in a short prompt's pass.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))


def record(path: Path) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """Every decode of the bench's two cases, plain greedy: prompt, reference and tokens."""
    from peers.speculative_whisper import _speech

    import edgert
    from edgert.families.whisper.streaming import StreamingTranscriber, silero_vad_artifact, stream_file
    from edgert.families.whisper.transcriber import Transcriber
    from edgert.runtime.vad import VoiceActivity

    tr = Transcriber(path, threads=1)
    cases: dict[str, list[dict[str, Any]]] = {"long-form": [], "streaming": []}
    inner, case = tr.decode_window, ["long-form"]

    def decode(cross: Any, previous: Any = (), *args: Any, reference: Any = (), **kwargs: Any) -> Any:
        hyp, no_speech = inner(cross, previous, *args, reference=reference, **kwargs)
        prompt = [tr.config["sot_prev"], *list(previous)[-(tr.model.max_length // 2 - 1) :]] if previous else []
        prompt += [tr.config["sot"]] + ([] if kwargs.get("timestamps", True) else [tr.config["no_timestamps"]])
        cases[case[0]].append({"prompt": prompt, "reference": list(reference), "tokens": list(hyp.tokens)})
        return hyp, no_speech

    tr.decode_window = decode  # type: ignore[method-assign]
    audio = _speech(Path(tempfile.mkdtemp(prefix="edgert-replay-")))
    for samples in audio:
        tr.transcribe(samples, beam_size=1)
    case[0] = "streaming"
    vad = VoiceActivity(edgert.load(silero_vad_artifact()))
    for samples in audio:
        list(stream_file(StreamingTranscriber(tr, vad), samples, chunk_seconds=1.0))
    return tr.config, cases


def replay(
    config: dict[str, Any], decodes: list[dict[str, Any]], cost: Any, k: int, fold: bool
) -> tuple[float, int, int]:
    """(plain steps / cost, rounds, accepted drafts) of `LookupSeq2Seq`'s policy (no gate) on ``decodes``."""
    from edgert.runtime.seq2seq_speculative import lookup_drafts

    tb, eot = config["timestamp_begin"], config["eot"]
    plain = spent = 0.0
    rounds = accepted = 0
    for dec in decodes:
        tokens, prompt = [*dec["tokens"], eot], dec["prompt"]
        reference = [*prompt[-3:], *dec["reference"]] if dec["reference"] else []

        i = 1  # the prefill gave tokens[0]
        plain += len(tokens) - 1
        if fold and reference and len(prompt) < 16:
            drafts = lookup_drafts(reference, prompt, min(k, 16 - len(prompt)), 3, tb, eot)[0]
            if drafts:
                a = _agree(drafts, tokens, 0)
                spent += cost(len(prompt) + len(drafts)) - cost(len(prompt))
                rounds, accepted, i = rounds + 1, accepted + a, a + 1
        while i < len(tokens):
            drafts = lookup_drafts(reference, prompt + tokens[:i], k, 3, tb, eot)[0]
            a = _agree(drafts, tokens, i) if drafts else 0
            spent += cost(len(drafts) + 1) if drafts else 1.0  # a plain step
            rounds, accepted = rounds + bool(drafts), accepted + a
            i += a + 1
    return plain / spent, rounds, accepted


def _agree(drafts: list[int], tokens: list[int], at: int) -> int:
    """How many of ``drafts`` equal ``tokens`` from ``at`` on."""
    n = 0
    while n < len(drafts) and at + n < len(tokens) and drafts[n] == tokens[at + n]:
        n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--costs", default="1.03,1.22,1.37,1.51,1.67,1.83,1.99,2.15,2.29")
    args = parser.parse_args()
    table = [float(c) for c in args.costs.split(",")]
    step = table[-1] - table[-2]

    def cost(rows: int) -> float:
        return table[rows - 1] if rows <= len(table) else table[-1] + (rows - len(table)) * step

    config, cases = record(args.artifact)
    for case, decodes in cases.items():
        for fold in (False, True):
            for k in (4, 6, 8):
                ratio, rounds, accepted = replay(config, decodes, cost, k, fold)
                where = "first drafts in the prompt's pass" if fold else "prompt alone"
                print(f"{case}: k={k}, {where}: {ratio:.3f}x, {rounds} rounds, {accepted} accepted")


if __name__ == "__main__":
    main()
