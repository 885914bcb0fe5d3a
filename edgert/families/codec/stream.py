"""A compiled neural audio codec on a device: whole-signal and streaming encode/decode, codes files.

The artifact's ``encode`` and ``decode`` entry points take a chunk and the flat state vector the
previous chunk returned; the streams here keep that state, cut the input into whole frames and
time the calls, so a caller pushes audio (or codes) as it arrives and gets codes (or audio) back.

Codes file (``.codes``), little-endian:

    offset  size  field
    0       4     magic b"EDGC"
    4       2     format version (1)
    6       2     n = length of the codec name
    8       n     codec name, UTF-8
    8+n     8     codec id: the first 8 bytes of the sha256 of the artifact's weights
    16+n    4     sample rate (Hz)
    20+n    4     hop length (samples per frame; frame rate = sample rate / hop)
    24+n    4     codebook size
    28+n    2     codebooks per frame in this file
    30+n    8     frames
    38+n    8     samples of the original audio (the decoded audio is cut to it)
    46+n    ...   codes, frames x codebooks, uint16
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgert.artifact.reader import Artifact, open_artifact
from edgert.errors import ArtifactError, EdgertError
from edgert.runtime.session import Session
from edgert.runtime.tvm_runtime import to_numpy

MAGIC = b"EDGC"
CODES_VERSION = 1
_FIXED = struct.Struct("<8sIIIHQQ")


class CodesFileError(EdgertError):
    """A codes file that is damaged or was written by another codec."""


@dataclass
class CodesFile:
    """The codes of one signal and the codec facts its header records."""

    codec: str
    codec_id: bytes
    sample_rate: int
    hop_length: int
    codebook_size: int
    codes: np.ndarray  # (frames, codebooks) int32
    num_samples: int

    @property
    def frame_rate(self) -> float:
        """Frames per second."""
        return self.sample_rate / self.hop_length

    def save(self, path: str | Path) -> None:
        """Write the header and the codes."""
        name = self.codec.encode()
        frames, books = self.codes.shape
        head = struct.pack("<4sHH", MAGIC, CODES_VERSION, len(name)) + name
        head += _FIXED.pack(
            self.codec_id, self.sample_rate, self.hop_length, self.codebook_size, books, frames, self.num_samples
        )
        try:
            Path(path).write_bytes(head + self.codes.astype("<u2").tobytes())
        except OSError as exc:
            raise CodesFileError(f"cannot write {path}: {exc.strerror or exc}") from exc

    @classmethod
    def load(cls, path: str | Path) -> CodesFile:
        """Read a codes file, refusing a damaged or foreign one."""
        path = Path(path)
        if not path.is_file():
            raise CodesFileError(f"codes file not found: {path}")
        data = path.read_bytes()
        if len(data) < 8 or data[:4] != MAGIC:
            raise CodesFileError(f"{path} is not an edgert codes file (magic {data[:4]!r}, expected {MAGIC!r})")
        version, n = struct.unpack_from("<HH", data, 4)
        if version != CODES_VERSION:
            raise CodesFileError(f"{path} has codes format version {version}; this edgert reads {CODES_VERSION}")
        if len(data) < 8 + n + _FIXED.size:
            raise CodesFileError(f"{path} is truncated (header incomplete)")
        name = data[8 : 8 + n].decode("utf-8", errors="replace")
        codec_id, rate, hop, size, books, frames, samples = _FIXED.unpack_from(data, 8 + n)
        body = data[8 + n + _FIXED.size :]
        if len(body) != 2 * frames * books:
            raise CodesFileError(
                f"{path} is truncated: {len(body)} bytes of codes, the header says {2 * frames * books}"
            )
        codes = np.frombuffer(body, "<u2").reshape(frames, books).astype(np.int32)
        return cls(name, codec_id, rate, hop, size, codes, samples)


@dataclass
class StreamStats:
    """Time spent in the compiled entry points against the audio duration they covered."""

    calls: int = 0
    chunk_calls: int = 0  # of them, calls of the fixed-shape entry point
    seconds: float = 0.0
    audio_seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)

    @property
    def real_time_factor(self) -> float:
        """Compute time over audio time (below 1 is faster than real time)."""
        return self.seconds / self.audio_seconds if self.audio_seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for reports."""
        lat = sorted(self.latencies)
        return {
            "calls": self.calls,
            "chunk_calls": self.chunk_calls,
            "seconds": round(self.seconds, 4),
            "audio_seconds": round(self.audio_seconds, 3),
            "real_time_factor": round(self.real_time_factor, 4),
            "median_call_ms": round(1000 * lat[len(lat) // 2], 3) if lat else None,
        }


class Codec:
    """A compiled codec: its session, its facts (rate, hop, codebooks) and its streams."""

    def __init__(self, artifact: Artifact | str | Path, threads: int | None = None):
        art = artifact if isinstance(artifact, Artifact) else open_artifact(artifact)
        if art.family != "codec":
            raise ArtifactError(f"{art.path} holds a '{art.family}' model, not a codec")
        self.artifact = art
        self.session = Session(art, threads)
        info = art.manifest["codec"]
        self.name: str = art.manifest["name"]
        self.codec_id = bytes.fromhex(art.manifest["files"][art.manifest["weights"]["file"]]["sha256"][:16])
        self.sample_rate: int = info["sample_rate"]
        self.hop_length: int = info["hop_length"]
        self.num_codebooks: int = info["num_codebooks"]
        self.min_codebooks: int = info.get("min_codebooks", 1)  # Mimi: its semantic codebooks
        self.codebook_size: int = info["codebook_size"]
        self.first_chunk_samples: int = info["first_chunk_samples"]
        self.first_chunk_frames: int = info["first_chunk_frames"]
        self.encoder_state: int = info["encoder_state"]
        self.decoder_state: int = info["decoder_state"]
        # Frames per call of the fixed-shape entry points (0: an artifact built without them).
        self.chunk_frames: int = info.get("chunk_frames", 0) if self.session.has_entry("encode_chunk") else 0

    @property
    def frame_rate(self) -> float:
        """Code frames per second."""
        return self.sample_rate / self.hop_length

    def bandwidth_kbps(self, codebooks: int) -> float:
        """Bitrate of ``codebooks`` codebooks per frame, kbit/s."""
        return codebooks * float(np.log2(self.codebook_size)) * self.frame_rate / 1000

    def codebooks_for(self, bandwidth_kbps: float | None) -> int:
        """Codebooks for a bitrate (the most that fit, at least one); all of them without one."""
        if bandwidth_kbps is None:
            return self.num_codebooks
        if bandwidth_kbps <= 0:
            raise EdgertError(f"bandwidth must be positive, got {bandwidth_kbps} kbit/s")
        per = self.bandwidth_kbps(1)
        books = int(bandwidth_kbps / per + 1e-9)
        if books < 1:
            raise EdgertError(
                f"{bandwidth_kbps} kbit/s is below this codec's lowest bitrate, {per:g} kbit/s (one codebook)"
            )
        return max(self.min_codebooks, min(books, self.num_codebooks))

    def takes_codebooks(self, count: int) -> bool:
        """Whether a frame may carry ``count`` codebooks (`min_codebooks`..`num_codebooks`)."""
        return self.min_codebooks <= count <= self.num_codebooks

    @property
    def codebook_range(self) -> str:
        """The codebook counts a frame may carry, as ``min..max``."""
        return f"{self.min_codebooks}..{self.num_codebooks}"

    def algorithmic_latency(self, stream: bool = True) -> int:
        """Samples of input a streamed round trip waits for before its first output: one frame,
        or the longer first chunk a reflect-padded codec needs."""
        return max(self.hop_length, self.first_chunk_samples) if stream else self.hop_length

    def encoder(self, codebooks: int | None = None) -> EncoderStream:
        """A new encoding stream keeping ``codebooks`` codes per frame (default: all)."""
        return EncoderStream(self, codebooks or self.num_codebooks)

    def decoder(self) -> DecoderStream:
        """A new decoding stream."""
        return DecoderStream(self)

    def encode(self, audio: np.ndarray, codebooks: int | None = None) -> np.ndarray:
        """Codes ``(frames, codebooks)`` of a whole signal in one call (zero-padded to whole frames)."""
        enc = self.encoder(codebooks)
        enc.chunk_min, enc.chunk = 0, 0
        return enc.push(audio, final=True)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Audio of whole-signal ``codes`` in one call."""
        dec = self.decoder()
        dec.chunk = 0
        return dec.push(codes, final=True)

    def check_codes(self, codes: CodesFile, where: str | Path) -> None:
        """Refuse codes written by another codec, or with more codebooks than this one has."""
        mine = (self.name, self.sample_rate, self.hop_length, self.codebook_size)
        theirs = (codes.codec, codes.sample_rate, codes.hop_length, codes.codebook_size)
        if mine != theirs or codes.codec_id != self.codec_id:
            raise CodesFileError(
                f"{where} was written by codec '{codes.codec}' ({codes.sample_rate} Hz, hop {codes.hop_length}, "
                f"{codes.codebook_size} codes, id {codes.codec_id.hex()}), but the artifact is '{self.name}' "
                f"({self.sample_rate} Hz, hop {self.hop_length}, {self.codebook_size} codes, id {self.codec_id.hex()})"
            )
        if not self.takes_codebooks(codes.codes.shape[1]):
            raise CodesFileError(
                f"{where} has {codes.codes.shape[1]} codebooks; this codec takes {self.codebook_range}"
            )
        if codes.codes.size and int(codes.codes.max()) >= self.codebook_size:
            raise CodesFileError(
                f"{where} holds code {int(codes.codes.max())}, past the codebook ({self.codebook_size})"
            )


class EncoderStream:
    """Audio in, codes out; state carried between pushes."""

    def __init__(self, codec: Codec, codebooks: int):
        if not codec.takes_codebooks(codebooks):
            raise EdgertError(f"codebooks must be {codec.codebook_range}, got {codebooks}")
        self.codec, self.codebooks = codec, codebooks
        self.state = np.zeros(codec.encoder_state, np.float32)
        self.pending = np.zeros(0, np.float32)
        self.first = True
        self.chunk_min = codec.first_chunk_samples  # a reflect-padded codec's first call needs this much
        self.chunk = codec.chunk_frames * codec.hop_length  # samples per call of "encode_chunk" (0: none)
        self.stats = StreamStats()

    def push(self, audio: np.ndarray, final: bool = False) -> np.ndarray:
        """Codes for every whole frame now available (all of it, zero-padded, when ``final``)."""
        hop = self.codec.hop_length
        self.pending = np.concatenate([self.pending, np.asarray(audio, np.float32).reshape(-1)])
        if final and len(self.pending) % hop:
            self.pending = np.concatenate([self.pending, np.zeros(hop - len(self.pending) % hop, np.float32)])
        usable = len(self.pending) // hop * hop
        if usable == 0 or (self.first and usable < self.chunk_min and not final):
            return np.zeros((0, self.codebooks), np.int32)
        chunk, self.pending = self.pending[:usable], self.pending[usable:]
        t = time.perf_counter()
        codes = np.concatenate([self._call("encode", piece)[:, : self.codebooks] for piece in self._split(chunk)])
        self._account(time.perf_counter() - t, usable)
        return codes

    def _split(self, data: np.ndarray) -> list[np.ndarray]:
        """Whole chunks for the fixed-shape entry point, then the rest for the symbolic one.

        A first call that needs more than one chunk (reflect padding) goes whole to the symbolic one.
        """
        size = self.chunk
        if not size or (self.first and size < self.first_rows):
            return [data]
        return [data[i : i + size] for i in range(0, len(data), size)]  # the last may be short

    @property
    def first_rows(self) -> int:
        """Samples the first call must cover (the codec's need, whatever ``chunk_min`` holds back)."""
        return self.codec.first_chunk_samples

    def _call(self, entry: str, data: np.ndarray) -> np.ndarray:
        """One call of ``entry`` (of its ``_chunk`` twin when ``data`` is one whole chunk); carries the state."""
        s = self.codec.session
        name = f"{entry}_chunk" if self.chunk and len(data) == self.chunk else entry
        flag = np.array([float(self.first)], np.float32)
        out = s(name, s.tensor(np.ascontiguousarray(data)), s.tensor(self.state), s.tensor(flag))
        self.state = to_numpy(out[1])
        self.first = False
        self.stats.calls += 1
        self.stats.chunk_calls += name != entry
        return to_numpy(out[0])

    def _account(self, seconds: float, samples: int) -> None:
        self.stats.seconds += seconds
        self.stats.latencies.append(seconds)
        self.stats.audio_seconds += samples / self.codec.sample_rate


class DecoderStream(EncoderStream):
    """Codes in, audio out; state carried between pushes."""

    def __init__(self, codec: Codec):
        super().__init__(codec, codec.num_codebooks)
        self.state = np.zeros(codec.decoder_state, np.float32)
        self.chunk = codec.chunk_frames  # frames per call of "decode_chunk"
        self.pending_codes: np.ndarray | None = None

    def push(self, codes: np.ndarray, final: bool = False) -> np.ndarray:  # type: ignore[override]
        """Audio for the frames pushed so far (a reflect-padded codec holds back its first few)."""
        codes = np.asarray(codes, np.int32)
        if codes.ndim != 2 or not self.codec.takes_codebooks(codes.shape[1]):
            raise EdgertError(f"codes must be (frames, {self.codec.codebook_range}), got shape {codes.shape}")
        if codes.size and (codes.min() < 0 or codes.max() >= self.codec.codebook_size):
            raise EdgertError(f"codes must lie in 0..{self.codec.codebook_size - 1}")
        if self.pending_codes is not None:
            codes = np.concatenate([self.pending_codes, codes])
            self.pending_codes = None
        if len(codes) == 0:
            return np.zeros(0, np.float32)
        if self.first and len(codes) < self.codec.first_chunk_frames and not final and self.chunk_min:
            self.pending_codes = codes
            return np.zeros(0, np.float32)
        t = time.perf_counter()
        audio = np.concatenate([self._call("decode", piece) for piece in self._split(codes)])
        self._account(time.perf_counter() - t, len(audio))
        return audio

    @property
    def first_rows(self) -> int:
        """Frames the first call must cover."""
        return self.codec.first_chunk_frames

    def flush(self) -> np.ndarray:
        """Audio for frames still held back."""
        if self.pending_codes is None:
            return np.zeros(0, np.float32)
        return self.push(np.zeros((0, self.pending_codes.shape[1]), np.int32), final=True)


def load_codec(path: str | Path, threads: int | None = None) -> Codec:
    """Open and verify a codec artifact and load it."""
    return Codec(path, threads)


def roundtrip(
    codec: Codec, audio: np.ndarray, codebooks: int | None = None, stream: bool = False, chunk_samples: int = 0
) -> tuple[np.ndarray, np.ndarray, EncoderStream, DecoderStream]:
    """Encode and decode ``audio`` whole, or streamed in chunks of ``chunk_samples`` as a live link would;
    (codes, audio cut to the input's length, the encoder and decoder streams with their timings)."""
    audio = np.asarray(audio, np.float32).reshape(-1)
    enc, dec = codec.encoder(codebooks), codec.decoder()
    if stream:
        if chunk_samples < 1:
            raise EdgertError(f"a streamed round trip needs a chunk of at least one sample, got {chunk_samples}")
        codes, pieces = [], []
        for start in range(0, len(audio), chunk_samples):
            last = start + chunk_samples >= len(audio)
            codes.append(enc.push(audio[start : start + chunk_samples], final=last))
            pieces.append(dec.push(codes[-1], final=last))
        pieces.append(dec.flush())
        all_codes, out = np.concatenate(codes), np.concatenate(pieces)
    else:
        enc.chunk_min = 0
        all_codes = enc.push(audio, final=True)
        out = dec.push(all_codes, final=True)
    return all_codes, out[: len(audio)], enc, dec
