"""What `edgert run/transcribe/codec roundtrip --device` do: open the device, deploy the artifact when
the device does not hold those bytes yet, read (and resample) the input on the host, and ask the
device's agent for the family's op. Each returns the agent's reply with ``device`` (uri, name, link)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

Deploy = Callable[[Any, Path], Any]  # (device, artifact) -> the deploy reply
Log = Callable[[str], None]


def _deploy(dev: Any, artifact: Path) -> Any:
    return dev.deploy(artifact)


def _quiet(message: str) -> None:
    pass


@contextmanager
def holding(uri: str, artifact: Path, deploy: Deploy | None = None) -> Iterator[Any]:
    """The open device ``uri``, with ``artifact`` deployed unless it holds the same bytes under its name."""
    from edgert.deploy import parse_device

    with parse_device(uri) as dev:
        if not dev.holds(artifact):
            (deploy or _deploy)(dev, artifact)
        else:
            ship_gpu_runtime(dev, artifact)
        yield dev


def ship_gpu_runtime(dev: Any, artifact: Path) -> None:
    """For a GPU artifact the device holds already: the OpenCL runtime library it needs, unless it has it."""
    from edgert.artifact.reader import open_artifact
    from edgert.deploy.gpu_runtime import ship

    # Its manifest only (no member hashes): the device holds these bytes, checked when they came.
    ship(dev, open_artifact(artifact, verify=False, check_host=False).manifest)


def _finish(result: dict[str, Any], uri: str, dev: Any) -> dict[str, Any]:
    result["device"] = {"uri": uri, "name": dev.name, "link": dev.link}
    result.pop("ok", None)
    result.pop("id", None)
    return result


def run(artifact: Path, uri: str, deploy: Deploy | None = None, **options: Any) -> dict[str, Any]:
    """Generate on the device with `edgert run`'s options (prompt, max_tokens, sampling, stop, raw, threads,
    context): the text, token ids, stats and threads."""
    with holding(uri, artifact, deploy) as dev:
        return _finish(dev.run(artifact.name, **options), uri, dev)


def transcribe(
    artifact: Path,
    audio: Path,
    uri: str,
    beam_size: int | None = None,
    threads: int | None = None,
    deploy: Deploy | None = None,
    log: Log = _quiet,
) -> dict[str, Any]:
    """Transcribe ``audio`` on the device: the host reads and resamples it to 16 kHz, the device does the rest."""
    from edgert.runtime.audio import read_wav

    loaded = read_wav(audio, 16000)
    if loaded.resampled:
        log(f"resampled {loaded.source_rate} Hz -> {loaded.sample_rate} Hz with soxr")
    options = {k: v for k, v in {"beam_size": beam_size, "threads": threads}.items() if v is not None}
    with holding(uri, artifact, deploy) as dev:
        return _finish(dev.transcribe(artifact.name, loaded.samples, loaded.sample_rate, **options), uri, dev)


def codec_roundtrip(
    artifact: Path,
    audio: Path,
    uri: str,
    stream: bool = False,
    chunk_ms: float = 80.0,
    bandwidth: float | None = None,
    threads: int | None = None,
    deploy: Deploy | None = None,
    log: Log = _quiet,
) -> dict[str, Any]:
    """Encode and decode ``audio`` on the device (read and resampled to the codec's rate on the host): the
    agent's facts, and ``codes``, ``audio`` (the round trip), ``input`` (what was sent) and ``sample_rate``."""
    from edgert.artifact.reader import open_artifact
    from edgert.runtime.audio import load_wav, resample

    rate = int(open_artifact(artifact, check_host=False).manifest["codec"]["sample_rate"])
    signal, source_rate = load_wav(audio)
    if source_rate != rate:
        log(f"resampling {audio} from {source_rate} Hz to {rate} Hz (libsoxr)")
        signal = resample(signal, source_rate, rate)
    options = {"stream": stream, "chunk_ms": chunk_ms, "bandwidth": bandwidth, "threads": threads}
    with holding(uri, artifact, deploy) as dev:
        facts, codes, result = dev.codec_roundtrip(artifact.name, signal, **options)
        facts = _finish(dict(facts), uri, dev)
    return {**facts, "codes": codes, "audio": result, "input": signal, "sample_rate": rate}
