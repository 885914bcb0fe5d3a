"""`edgert codec encode|decode|roundtrip`: speech to codes and back with a codec artifact, whole or
streamed, locally or on a device (`edgert.families.codec.stream`, `edgert.deploy.remote`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from edgert.cli.common import AllowUnsignedOpt, DeviceOpt, ThreadsOpt, err, upload

app = typer.Typer(help="Neural audio codecs: encode speech to codes and back, streaming.", no_args_is_help=True)
CodecArg = Annotated[Path, typer.Argument(help="A compiled codec artifact.")]
AudioArg = Annotated[Path, typer.Argument(help="A WAV file (resampled to the codec's rate if needed).")]
WavOut = Annotated[Path, typer.Option("--output", "-o", help="WAV file to write.")]
BandwidthOpt = Annotated[
    float | None, typer.Option("--bandwidth", "-b", help="Bitrate in kbit/s (default: all codebooks).")
]


def _load_audio(path: Path, codec: Any) -> Any:
    from edgert.runtime.audio import load_wav, resample

    audio, rate = load_wav(path)
    if rate != codec.sample_rate:
        err.print(f"[dim]resampling {path} from {rate} Hz to {codec.sample_rate} Hz (libsoxr)[/]", highlight=False)
        audio = resample(audio, rate, codec.sample_rate)
    return audio


def _report(codec: Any, stream: Any, books: int, samples: int, streamed: bool, what: str) -> None:
    st = stream.stats
    latency = codec.algorithmic_latency(streamed)
    err.print(
        f"[dim]{what}: {samples / codec.sample_rate:.2f} s of audio, {books} codebooks = "
        f"{codec.bandwidth_kbps(books):g} kbit/s at {codec.frame_rate:g} frames/s; real-time factor "
        f"{st.real_time_factor:.4f} ({st.calls} calls, {codec.session.threads} threads); algorithmic latency "
        f"{latency} samples ({1000 * latency / codec.sample_rate:.1f} ms)[/]",
        highlight=False,
        soft_wrap=True,
    )


def _against_input(result: Any, signal: Any, rate: int) -> str:
    from edgert.profile.audio_quality import against_input

    q = against_input(result, signal, rate)
    return (
        f"SI-SNR {q['si_snr']:.2f} dB, mel distance {q['mel_distance']:.3f} against the input "
        f"(output {q['lag']} samples behind it)"
    )


@app.command("encode")
def encode(
    artifact: CodecArg,
    audio: AudioArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="Codes file to write.")],
    bandwidth: BandwidthOpt = None,
    threads: ThreadsOpt = None,
    unsigned: AllowUnsignedOpt = False,
) -> None:
    """Encode AUDIO into a codes file."""
    from edgert.families.codec.stream import CodesFile, load_codec

    codec = load_codec(artifact, threads)
    books = codec.codebooks_for(bandwidth)
    signal = _load_audio(audio, codec)
    enc = codec.encoder(books)
    enc.chunk_min = 0
    codes = enc.push(signal, final=True)
    CodesFile(
        codec.name, codec.codec_id, codec.sample_rate, codec.hop_length, codec.codebook_size, codes, len(signal)
    ).save(output)
    _report(codec, enc, books, len(signal), False, "encoded")
    err.print(f"[green]wrote[/] {output} ({len(codes)} frames x {books} codebooks)", highlight=False)


@app.command("decode")
def decode(
    artifact: CodecArg,
    codes: Annotated[Path, typer.Argument(help="A codes file written by `edgert codec encode`.")],
    output: WavOut,
    threads: ThreadsOpt = None,
    unsigned: AllowUnsignedOpt = False,
) -> None:
    """Decode a codes file into a WAV file."""
    from edgert.families.codec.stream import CodesFile, load_codec
    from edgert.runtime.audio import write_wav

    data = CodesFile.load(codes)
    codec = load_codec(artifact, threads)
    codec.check_codes(data, codes)
    dec = codec.decoder()
    signal = dec.push(data.codes, final=True)[: data.num_samples]
    write_wav(output, signal, codec.sample_rate)
    _report(codec, dec, data.codes.shape[1], len(signal), False, "decoded")
    err.print(f"[green]wrote[/] {output}", highlight=False)


@app.command("roundtrip")
def roundtrip(
    artifact: CodecArg,
    audio: AudioArg,
    output: WavOut,
    stream: Annotated[
        bool, typer.Option("--stream", help="Encode and decode in chunks, as a live link would.")
    ] = False,
    chunk_ms: Annotated[float, typer.Option("--chunk-ms", help="Chunk length when streaming.")] = 80.0,
    bandwidth: BandwidthOpt = None,
    threads: ThreadsOpt = None,
    device: DeviceOpt = None,
    unsigned: AllowUnsignedOpt = False,
) -> None:
    """Encode and decode AUDIO (whole, or streamed in chunks); print bitrate, quality and speed."""
    from edgert.families.codec.stream import load_codec
    from edgert.families.codec.stream import roundtrip as codec_roundtrip
    from edgert.runtime.audio import write_wav

    if device is not None:
        _roundtrip_on_device(artifact, audio, output, device, stream, chunk_ms, bandwidth, threads)
        return
    codec = load_codec(artifact, threads)
    books = codec.codebooks_for(bandwidth)
    signal = _load_audio(audio, codec)
    chunk = max(1, int(chunk_ms * codec.sample_rate / 1000))
    _, result, enc, dec = codec_roundtrip(codec, signal, books, stream, chunk)
    write_wav(output, result, codec.sample_rate)
    _report(codec, enc, books, len(signal), stream, "encode")
    _report(codec, dec, books, len(signal), stream, "decode")
    err.print(f"[green]wrote[/] {output}: {_against_input(result, signal, codec.sample_rate)}", highlight=False)


def _roundtrip_on_device(
    artifact: Path,
    audio: Path,
    output: Path,
    uri: str,
    stream: bool,
    chunk_ms: float,
    bandwidth: float | None,
    threads: int | None,
) -> None:
    """`edgert codec roundtrip --device`: the host reads the audio, the device encodes and decodes it."""
    from edgert.deploy import remote
    from edgert.runtime.audio import write_wav

    def log(message: str) -> None:
        err.print(f"[dim]{escape(message)}[/]", highlight=False)

    facts = remote.codec_roundtrip(artifact, audio, uri, stream, chunk_ms, bandwidth, threads, deploy=upload, log=log)
    rate, signal, result, dev = facts["sample_rate"], facts["input"], facts["audio"], facts["device"]
    write_wav(output, result, rate)
    for what in ("encode", "decode"):
        st = facts[what]
        err.print(
            f"[dim]{what} on {escape(dev['name'])} via {dev['link']}: {len(signal) / rate:.2f} s of audio, "
            f"{facts['codebooks']} codebooks = {facts['bandwidth_kbps']:g} kbit/s; real-time factor "
            f"{st['real_time_factor']:.4f} ({st['calls']} calls, {facts['threads']} threads); algorithmic latency "
            f"{facts['algorithmic_latency']} samples ({1000 * facts['algorithmic_latency'] / rate:.1f} ms)[/]",
            highlight=False,
            soft_wrap=True,
        )
    err.print(
        f"[green]wrote[/] {output}: {len(facts['codes'])} frames, {_against_input(result, signal, rate)}",
        highlight=False,
    )
