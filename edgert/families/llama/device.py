"""What the device agent does with a Llama artifact (`Family.device_ops`)."""

from __future__ import annotations

from typing import Any


def run(model: Any, header: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
    """Generate from a prompt with the options of `edgert run`; the text, token ids and stats."""
    from edgert.runtime.sampling import SamplingParams

    s = header.get("sampling", {})
    sampling = SamplingParams(
        float(s.get("temperature", 0.0)),
        int(s.get("top_k", 0)),
        float(s.get("top_p", 1.0)),
        float(s.get("repetition_penalty", 1.0)),
        s.get("seed"),
    )
    model.reset()
    prompt = header.get("prompt")
    text = prompt if prompt is not None else model.artifact.manifest.get("defaults", {}).get("prompt", "Hello!")
    chat = not header.get("raw", False) and model.tokenizer.has_chat_template
    pieces, ids = [], []
    max_tokens, stop = int(header.get("max_tokens", 256)), header.get("stop") or ()
    for tok in model.generate(text, max_tokens=max_tokens, sampling=sampling, stop=stop, chat=chat):
        ids.append(tok.id)
        pieces.append(tok.text)
    return {
        "prompt": text,
        "text": "".join(pieces),
        "tokens": ids,
        "stats": model.stats.to_dict(),
        "threads": model.session.threads,
    }, b""
