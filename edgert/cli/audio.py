"""`edgert transcribe`: speech to timestamped text with a Whisper artifact, whole or streamed through a
VAD, locally or on a device (`Transcriber`, `StreamingTranscriber`, `edgert.deploy.remote`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from edgert.cli.common import AllowUnsignedOpt, DeviceOpt, ThreadsOpt, err, note, upload
from edgert.errors import EdgertError


def transcribe(
    artifact: Annotated[Path, typer.Argument(help="A compiled Whisper .edgert artifact.")],
    audio: Annotated[Path, typer.Argument(help="A WAV file (any rate; mixed down to mono, resampled to 16 kHz).")],
    beam: Annotated[
        int | None, typer.Option("--beam", "-b", help="Beam size (1: greedy; default: the model's, 5).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (segments, text, stats).")] = False,
    stream: Annotated[
        bool, typer.Option("--stream", help="Feed the file in chunks through VAD, printing partial and final text.")
    ] = False,
    realtime: Annotated[
        bool, typer.Option("--realtime/--fast", help="With --stream: at the audio's own pace, or as fast as possible.")
    ] = False,
    chunk: Annotated[float, typer.Option("--chunk", help="With --stream: seconds of audio per chunk.")] = 1.0,
    vad: Annotated[
        Path | None,
        typer.Option("--vad", help="With --stream: a compiled silero-vad artifact (default: compiled once, cached)."),
    ] = None,
    threads: ThreadsOpt = None,
    device: DeviceOpt = None,
    speculative: Annotated[
        str | None,
        typer.Option(
            "--speculative",
            help="Greedy decoding with drafts, same transcript: lookup[:k=6,ngram=3] (the previous window's text and "
            "the tokens so far), or the decoder's own layers: self:k=4, self:k=4,skip=2 or self:k=3,exit=2.",
        ),
    ] = None,
    exit_policy: Annotated[
        str | None,
        typer.Option(
            "--exit", help="Early exit in the decoder's greedy steps: confidence:0.9, entropy:0.5, static:3, state:0.9."
        ),
    ] = None,
    unsigned: AllowUnsignedOpt = False,
) -> None:
    """Transcribe speech in AUDIO with a Whisper artifact, printing timestamped segments."""
    from edgert.families.whisper.transcriber import Transcriber, TranscriptionStats
    from edgert.runtime.audio import read_wav

    if device is not None:
        if speculative or exit_policy:
            raise EdgertError("--speculative and --exit run on this machine only; drop --device to use them")
        if stream:
            raise EdgertError("--stream runs on this machine only; drop --device, or transcribe the whole file on it")
        _transcribe_on_device(artifact, audio, device, beam, as_json, threads)
        return
    audio_read = read_wav(audio)  # Whisper hears 16 kHz; bad audio fails here, before the model loads
    transcriber = Transcriber(artifact, threads=threads, speculative=speculative, exit=exit_policy)
    beam_size = beam if beam is not None else transcriber.default_beam_size
    loaded = transcriber.load_audio(audio_read)
    if loaded.resampled:
        err.print(f"[dim]resampled {loaded.source_rate} Hz -> {loaded.sample_rate} Hz with soxr[/]")
    if loaded.source_channels > 1:
        err.print(f"[dim]mixed {loaded.source_channels} channels down to mono[/]")
    if stream:
        _transcribe_stream(transcriber, loaded.samples, vad, chunk, realtime, as_json)
        return
    stats = TranscriptionStats()
    segments = []
    for seg in transcriber.segments(loaded, beam_size=beam_size, stats=stats):
        segments.append(seg)
        if not as_json:
            print(f"[{seg.start:7.2f} -> {seg.end:7.2f}] {seg.text.strip()}", flush=True)
    text = "".join(s.text for s in segments).strip()
    if as_json:
        print(
            json.dumps(
                {
                    "text": text,
                    "segments": [s.to_dict() for s in segments],
                    "beam_size": beam_size,
                    "resampled_from": loaded.source_rate if loaded.resampled else None,
                    "stats": stats.to_dict(),
                    **({"speculative": transcriber.speculative.stats.to_dict()} if transcriber.speculative else {}),
                    **({"early_exit": transcriber.early_exit.stats()} if transcriber.early_exit else {}),
                }
            )
        )
        return
    _speculative_note(transcriber)
    if transcriber.early_exit is not None:
        e = transcriber.early_exit
        err.print(
            f"[dim]early exit {e.policy.name}: {e.mean_layers:.2f} of {e.layers.num_layers} decoder layers per token[/]"
        )
    err.print(
        f"[dim]{stats.audio_seconds:.1f} s of audio in {stats.total_seconds:.2f} s "
        f"(real-time factor {stats.real_time_factor:.3f}; encoder {stats.encode_seconds:.2f} s, "
        f"decoder {stats.decode_seconds:.2f} s, beam {beam_size}, {transcriber.model.session.threads} threads)[/]",
        soft_wrap=True,
    )


def _speculative_note(transcriber: Any) -> None:
    """The drafts' acceptance, where ``--speculative`` drafted."""
    if transcriber.speculative is not None:
        s = transcriber.speculative.stats
        err.print(
            f"[dim]speculative: {s.accepted}/{s.drafted} drafts accepted "
            f"({s.acceptance_rate:.2f}), {s.rounds} rounds[/]"
        )


def _transcribe_stream(
    transcriber: Any, samples: Any, vad: Path | None, chunk: float, realtime: bool, as_json: bool
) -> None:
    from edgert.families.registry import load
    from edgert.families.whisper.streaming import StreamingTranscriber, silero_vad_artifact, stream_file
    from edgert.runtime.vad import VoiceActivity

    streamer = StreamingTranscriber(transcriber, VoiceActivity(load(vad or silero_vad_artifact(note))))
    finals = []
    for event in stream_file(streamer, samples, chunk, realtime):
        if as_json:
            print(json.dumps(event.to_dict()), flush=True)
        elif event.kind == "final":
            finals.append(event)
            print(f"[{event.start:7.2f} -> {event.end:7.2f}] {event.text}  (latency {event.latency:.2f} s)", flush=True)
        elif event.kind == "commit":
            err.print(f"[green]+ {escape(event.text.strip())}[/]", highlight=False)
        else:
            err.print(f"[dim]~ {escape(event.text.strip())}[/]", highlight=False)
    s = streamer.stats
    spec = transcriber.speculative
    if as_json:
        print(json.dumps({"kind": "stats", **s.to_dict(), **({"speculative": spec.stats.to_dict()} if spec else {})}))
        return
    _speculative_note(transcriber)
    med = sorted(s.latencies)[len(s.latencies) // 2] if s.latencies else 0.0
    err.print(
        f"[dim]{len(finals)} utterances, {s.audio_seconds:.1f} s of audio, real-time factor {s.real_time_factor:.3f}, "
        f"latency end of speech -> final text median {med:.2f} s, max {max(s.latencies, default=0.0):.2f} s, "
        f"{s.decodes} decodes ({s.reused_finals} finals without one) "
        f"({'real-time pace' if realtime else 'as fast as possible'}, {chunk:g} s chunks)[/]",
        soft_wrap=True,
    )


def _transcribe_on_device(
    artifact: Path, audio: Path, uri: str, beam: int | None, as_json: bool, threads: int | None
) -> None:
    """`edgert transcribe --device`: the host reads and resamples the audio, the device does the rest."""
    from edgert.deploy import remote

    result = remote.transcribe(artifact, audio, uri, beam, threads, deploy=upload, log=note)
    if as_json:
        print(json.dumps(result))
        return
    for seg in result["segments"]:
        print(f"[{seg['start']:7.2f} -> {seg['end']:7.2f}] {seg['text'].strip()}", flush=True)
    st, dev = result["stats"], result["device"]
    err.print(
        f"[dim]{st['audio_seconds']:.1f} s of audio in {st['total_seconds']:.2f} s on {dev['name']} "
        f"via {dev['link']} (real-time factor {st['real_time_factor']:.3f}; encoder {st['encode_seconds']:.2f} s, "
        f"decoder {st['decode_seconds']:.2f} s, beam {result['beam_size']}, {result['threads']} threads)[/]",
        soft_wrap=True,
        highlight=False,
    )
