"""Streaming voice-activity detection over a compiled silero-vad graph.

silero-vad (the `silero-vad` package's ``silero_vad_openvino_16k.onnx``, compiled with
``edgert compile``) takes 576 samples at 16 kHz: the last 64 samples of the previous chunk
followed by 512 new ones, and a recurrent state ``[2, 1, 128]``; it returns the speech
probability and the next state. `VoiceActivity` carries both between calls:

    vad = VoiceActivity(edgert.load("vad.edgert"))
    for chunk in chunks_of_512_samples:
        p = vad(chunk)            # probability that the chunk holds speech
    vad.reset()                   # before an unrelated stream

The graph itself stays callable by name for other loops: ``model(input=x, state=s)``.
"""

from __future__ import annotations

import numpy as np

from edgert.errors import EdgertError
from edgert.runtime.graph import GraphModel

SAMPLE_RATE = 16000
CHUNK = 512
CONTEXT = 64


class VoiceActivity:
    """Speech probability per 512-sample chunk of 16 kHz audio, state and context carried across calls."""

    def __init__(self, model: GraphModel):
        names = set(model.input_names)
        if not {"input", "state"} <= names:
            raise EdgertError(f"not a silero-vad graph: inputs are {', '.join(model.input_names)}")
        self.model = model
        spec = next(i for i in model.inputs if i["name"] == "state")
        self._state_shape = [d if isinstance(d, int) else 1 for d in spec["shape"]]
        self._takes_sr = "sr" in names
        self.reset()

    def reset(self) -> None:
        """Forget the stream: zero state and zero context."""
        self.state = np.zeros(self._state_shape, np.float32)
        self.context = np.zeros(CONTEXT, np.float32)

    def __call__(self, chunk: np.ndarray) -> float:
        """The speech probability of one chunk of 512 float samples in [-1, 1]."""
        chunk = np.asarray(chunk, np.float32).reshape(-1)
        if chunk.shape[0] != CHUNK:
            raise EdgertError(f"silero-vad takes chunks of {CHUNK} samples at {SAMPLE_RATE} Hz, got {chunk.shape[0]}")
        x = np.concatenate([self.context, chunk])[None, :]
        feeds = {"input": x, "state": self.state}
        if self._takes_sr:
            feeds["sr"] = np.array(SAMPLE_RATE, np.int64)
        out = self.model(feeds)
        self.state = out["stateN"]
        self.context = chunk[-CONTEXT:].copy()
        return float(out["output"].reshape(-1)[0])

    def probabilities(self, audio: np.ndarray) -> np.ndarray:
        """Probabilities of every whole chunk of ``audio`` (a tail shorter than a chunk is zero-padded)."""
        audio = np.asarray(audio, np.float32).reshape(-1)
        pad = -len(audio) % CHUNK
        audio = np.concatenate([audio, np.zeros(pad, np.float32)])
        return np.array([self(audio[i : i + CHUNK]) for i in range(0, len(audio), CHUNK)], np.float32)
