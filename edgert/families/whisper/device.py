"""What the device agent does with a Whisper artifact (`Family.device_ops`)."""

from __future__ import annotations

from typing import Any


def transcribe(model: Any, header: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
    """Transcribe the payload (mono float32 samples at ``sample_rate``) with a Whisper artifact."""
    import numpy as np

    from edgert.families.whisper.transcriber import TranscriptionStats

    audio = model.load_audio(np.frombuffer(payload, "<f4"), int(header.get("sample_rate", model.sample_rate)))
    beam = header.get("beam_size") or model.artifact.manifest.get("defaults", {}).get("beam_size", 1)
    stats = TranscriptionStats()
    segments = [s.to_dict() for s in model.segments(audio, beam_size=int(beam), stats=stats)]
    return {
        "text": "".join(s["text"] for s in segments).strip(),
        "segments": segments,
        "beam_size": int(beam),
        "stats": stats.to_dict(),
        "threads": model.model.session.threads,
    }, b""
