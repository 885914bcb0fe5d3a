"""What the device agent does with a codec artifact (`Family.device_ops`)."""

from __future__ import annotations

from typing import Any


def roundtrip(model: Any, header: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
    """Encode and decode the payload (mono float32 at the codec's rate), whole or streamed in chunks;
    the payload back holds the codes (int32, frames x codebooks) and then the audio (float32)."""
    import numpy as np

    from edgert.families.codec.stream import roundtrip

    books = model.codebooks_for(header.get("bandwidth"))
    chunk = max(1, int(float(header.get("chunk_ms", 80.0)) * model.sample_rate / 1000))
    stream = bool(header.get("stream", False))
    codes, audio, enc, dec = roundtrip(model, np.frombuffer(payload, "<f4"), books, stream, chunk)
    codes_bytes = np.ascontiguousarray(codes, "<i4").tobytes()
    return {
        "codes_shape": list(codes.shape),
        "codes_bytes": len(codes_bytes),
        "codebooks": books,
        "bandwidth_kbps": model.bandwidth_kbps(books),
        "sample_rate": model.sample_rate,
        "stream": stream,
        "algorithmic_latency": model.algorithmic_latency(stream),
        "encode": enc.stats.to_dict(),
        "decode": dec.stats.to_dict(),
        "threads": model.session.threads,
    }, codes_bytes + np.ascontiguousarray(audio, "<f4").tobytes()
