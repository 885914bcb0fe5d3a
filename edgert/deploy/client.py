"""The host's side of a device link: a `Device` speaks to an agent through a `Channel`.

A channel carries one request frame and brings back one reply frame; `Device` builds the
requests (verified, chunked uploads; runs; profiles; fetches) on top of any of them.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import socket
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgert.deploy.protocol import (
    CHUNK,
    AuthError,
    FrameError,
    PySerialPort,
    SerialLink,
    authenticate,
    decode_frame,
    encode_frame,
    file_reader,
    read_frame,
    socket_reader,
)
from edgert.errors import ArtifactError, ContextLengthError, DeviceError, TargetError
from edgert.runtime.audio import AudioError

Progress = Callable[[int, int], None]
_ERRORS: dict[str, type[Exception]] = {
    "AudioError": AudioError,
    "ArtifactError": ArtifactError,
    "TargetError": TargetError,
    "ContextLengthError": ContextLengthError,
    "FrameError": FrameError,
    "AuthError": AuthError,
    "SignatureError": ArtifactError,
    "ValueError": ValueError,
}


class Channel:
    """Carries frames to an agent and back."""

    chunk = CHUNK
    discarded = 0  # stale replies read past (answers to requests given up on)

    def exchange(self, header: dict[str, Any], payload: bytes, timeout: float | None) -> tuple[dict[str, Any], bytes]:
        """Send one request; its reply."""
        raise NotImplementedError

    def _answer(self, header: dict[str, Any], read: Callable[[], tuple[dict[str, Any], bytes]]) -> tuple[dict, bytes]:
        """The reply to ``header`` among the frames ``read`` returns: those with another request id are stale."""
        while True:
            reply, data = read()
            # No id: a FrameError about a request the agent could not read, or an agent before protocol 2.
            if "id" not in reply or reply["id"] == header.get("id"):
                return reply, data
            self.discarded += 1

    def close(self) -> None:
        """Release the link."""


class InProcessChannel(Channel):
    """An agent in this process (the `local` device)."""

    def __init__(self, agent: Any):
        self.agent = agent

    def exchange(self, header: dict[str, Any], payload: bytes, timeout: float | None) -> tuple[dict[str, Any], bytes]:
        """Call the agent directly."""
        return self.agent.handle(header, payload)  # a call: no reply can be stale


class SocketChannel(Channel):
    """One TCP connection to an agent (board://, adb:// after its port forward)."""

    def __init__(self, host: str, port: int, where: str, connect_timeout: float = 10.0):
        self.where = where
        try:
            self.sock = socket.create_connection((host, port), timeout=connect_timeout)
        except ConnectionRefusedError as exc:
            raise DeviceError(f"{where}: connection refused on {host}:{port} (is the agent running there?)") from exc
        except TimeoutError as exc:
            raise DeviceError(f"{where}: device unreachable ({host}:{port} did not answer)") from exc
        except OSError as exc:
            raise DeviceError(f"{where}: device unreachable ({exc.strerror or exc})") from exc
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._read = socket_reader(self.sock, where)

    def exchange(self, header: dict[str, Any], payload: bytes, timeout: float | None) -> tuple[dict[str, Any], bytes]:
        """Write the request, read the reply."""
        self.sock.settimeout(timeout)
        try:
            self.sock.sendall(encode_frame(header, payload))
        except OSError as exc:
            raise DeviceError(f"{self.where}: the link was cut ({exc})") from exc
        return self._answer(header, lambda: read_frame(self._read))

    def close(self) -> None:
        """Close the connection."""
        self.sock.close()


class ProcessChannel(Channel):
    """An agent on the pipes of a child process (``ssh host python -m edgert.deploy.agent --stdio``)."""

    def __init__(self, argv: list[str], where: str):
        self.where, self.argv = where, argv
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except FileNotFoundError as exc:
            raise DeviceError(f"{where}: '{argv[0]}' is not installed") from exc
        assert self.proc.stdout is not None
        self._read = file_reader(self.proc.stdout, where)

    def exchange(self, header: dict[str, Any], payload: bytes, timeout: float | None) -> tuple[dict[str, Any], bytes]:
        """Write the request to the child's stdin, read the reply from its stdout."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(encode_frame(header, payload))
            self.proc.stdin.flush()
            return self._answer(header, lambda: read_frame(self._read))
        except (OSError, DeviceError) as exc:
            raise DeviceError(f"{self.where}: the link was cut ({self._stderr() or exc})") from exc

    def _stderr(self) -> str:
        if self.proc.poll() is None:
            return ""
        assert self.proc.stderr is not None
        lines = self.proc.stderr.read().decode(errors="replace").strip().splitlines()
        return lines[-1] if lines else f"exit status {self.proc.returncode}"

    def close(self) -> None:
        """End the child (closing its stdin ends the agent)."""
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class SerialChannel(Channel):
    """A UART (pyserial): frames as acknowledged, CRC-checked packets."""

    chunk = 1 << 18

    def __init__(self, device: str, baud: int, where: str, retries: int = 12, ack_timeout: float = 2.0):
        import serial  # pyserial

        try:
            self.port = serial.Serial(device, baud, timeout=1.0)
        except (serial.SerialException, OSError) as exc:
            raise DeviceError(f"{where}: cannot open {device} ({exc})") from exc
        self.link = SerialLink(PySerialPort(self.port), name=where, retries=retries, ack_timeout=ack_timeout)

    def exchange(self, header: dict[str, Any], payload: bytes, timeout: float | None) -> tuple[dict[str, Any], bytes]:
        """Send the request as one message, wait for the message that answers it."""
        msg = self.link.send_message(encode_frame(header, payload))
        return self._answer(header, lambda: decode_frame(self.link.recv_message(timeout, reply_to=msg)))

    def close(self) -> None:
        """Close the port."""
        self.port.close()


class RpcChannel(Channel):
    """TVM RPC: each frame goes through the remote global function ``edgert.agent.request``."""

    def __init__(self, host: str, port: int, where: str):
        import tvm.rpc

        self.where = where
        try:
            self.session = tvm.rpc.connect(host, port, key="edgert", session_timeout=0)
            self.func = self.session.get_function("edgert.agent.request")
        except Exception as exc:  # TVM reports refused or unreachable as a generic error
            raise DeviceError(f"{where}: cannot open a TVM RPC session with {host}:{port} ({exc})") from exc

    hung = False  # a call outlived its timeout: the session is given up

    def exchange(self, header: dict[str, Any], payload: bytes, timeout: float | None) -> tuple[dict[str, Any], bytes]:
        """Call the remote function with the request frame; it returns the reply frame.

        TVM's RPC call has no timeout of its own and a device that hangs without closing its
        connection blocks it forever: with ``timeout`` the call runs on a helper thread, and one
        that outlives it is abandoned (the session with it) and reported as a DeviceError.
        """
        if self.hung or self.func is None:
            raise DeviceError(f"{self.where}: the session was given up (a call did not return)")
        frame = bytearray(encode_frame(header, payload))
        if timeout is None:
            return decode_frame(bytes(self._call(frame)))
        box: dict[str, Any] = {}

        def call() -> None:
            try:
                box["reply"] = self._call(frame)
            except BaseException as exc:  # handed to the caller's thread
                box["error"] = exc

        helper = threading.Thread(target=call, daemon=True, name="rpc-call")
        helper.start()
        helper.join(timeout)
        if helper.is_alive():
            self.hung = True
            raise DeviceError(f"{self.where}: no answer within {timeout:g} s (the device hangs)")
        if "error" in box:
            raise box["error"]
        return decode_frame(bytes(box["reply"]))  # a call returns its own reply: none can be stale

    def _call(self, frame: bytearray) -> Any:
        try:
            return self.func(frame)
        except Exception as exc:
            raise DeviceError(f"{self.where}: the RPC call failed ({str(exc).strip().splitlines()[-1]})") from exc


class Device:
    """A device reached through ``channel``: deploy, run, profile, fetch."""

    def __init__(self, uri: str, link: str, channel: Channel, timeout: float = 3600.0):
        self.uri, self.link, self.channel, self.timeout = uri, link, channel, timeout
        self._ids = itertools.count(int.from_bytes(os.urandom(3), "big") << 16)  # unlike an earlier link's
        self._hello: dict[str, Any] | None = None
        self.root: Path | None = None  # the agent's folder, where it is on this machine

    def request(self, header: dict[str, Any], payload: bytes = b"") -> tuple[dict[str, Any], bytes]:
        """One request; the agent's refusal becomes the matching EdgertError."""
        header = {**header, "id": next(self._ids)}
        reply, data = self.channel.exchange(header, payload, self.timeout)
        if not reply.get("ok"):
            cls = _ERRORS.get(str(reply.get("kind")), DeviceError)
            raise cls(f"{self.uri}: {reply.get('error')}")
        return reply, data

    def authenticate(self, secret: bytes) -> None:
        """Prove to the agent that this host holds the device's secret (after the agent proved it does)."""

        def exchange(header: dict[str, Any]) -> dict[str, Any]:
            return self.channel.exchange({**header, "id": next(self._ids)}, b"", self.timeout)[0]

        authenticate(exchange, secret, self.uri)

    def hello(self) -> dict[str, Any]:
        """What the device is (arch, CPU features, free space, artifacts); asked once."""
        if self._hello is None:
            self._hello = self.request({"op": "hello"})[0]
        return self._hello

    @property
    def name(self) -> str:
        """The device's name as its agent reports it."""
        return str(self.hello()["device"])

    def check_artifact(self, artifact: Path) -> dict[str, Any]:
        """Verify ``artifact`` here and refuse it early when the device cannot run it."""
        from edgert.artifact.reader import open_artifact

        art = open_artifact(artifact, check_host=False)
        t, hello = art.target, self.hello()
        if t.get("arch") != hello["arch"]:
            raise TargetError(
                f"{artifact} was compiled for target '{t.get('name')}' ({t.get('arch')}, {t.get('cpu')}), "
                f"but {self.uri} is {hello['arch']}: compile it with --target for that device"
            )
        missing = sorted(set(t.get("cpu_flags", [])) - set(hello["cpu_flags"]))
        if missing:
            raise TargetError(
                f"{artifact} was compiled for CPU '{t.get('cpu')}' and needs CPU features "
                f"{self.uri} lacks: {', '.join(missing)}"
            )
        return art.manifest

    def deploy(self, artifact: str | Path, progress: Progress | None = None) -> dict[str, Any]:
        """Upload ``artifact`` in chunks; the device checks its sha256 and renames it into place."""
        artifact = Path(artifact)
        if artifact.is_dir():
            raise ArtifactError(f"{artifact} is a folder: deploy a single-file artifact (compile without --dir)")
        manifest = self.check_artifact(artifact)
        if manifest["target"].get("kind") == "gpu":  # the OpenCL runtime goes first, and the device is checked
            from edgert.deploy.gpu_runtime import ship

            ship(self, manifest)
        size = artifact.stat().st_size
        with artifact.open("rb") as fh:
            digest = hashlib.file_digest(fh, "sha256").hexdigest()
        begin, _ = self.request({"op": "put_begin", "name": artifact.name, "size": size, "sha256": digest})
        sent = 0
        with artifact.open("rb") as fh:
            while block := fh.read(self.channel.chunk):
                self.request({"op": "put_chunk", "upload": begin["upload"], "offset": sent}, block)
                sent += len(block)
                if progress:
                    progress(sent, size)
        reply, _ = self.request({"op": "put_end", "upload": begin["upload"]})
        self._hello = None
        return reply

    def holds(self, artifact: Path) -> bool:
        """True if the device has the same bytes as ``artifact`` under its name (no upload needed)."""
        if not artifact.is_file():
            return False
        with artifact.open("rb") as fh:
            digest = hashlib.file_digest(fh, "sha256").hexdigest()
        return any(a["name"] == artifact.name and a.get("sha256") == digest for a in self.hello()["artifacts"])

    def run(self, name: str, **options: Any) -> dict[str, Any]:
        """Generate on the device with the options of `edgert run`; text, token ids and stats."""
        return self.request({"op": "run", "name": name, **options})[0]

    def profile(self, name: str, **options: Any) -> dict[str, Any]:
        """Profile the deployed artifact ``name`` on the device; the measurements."""
        reply, _ = self.request({"op": "profile", "name": name, **options})
        result = dict(reply["result"])
        result["saved_on_device"] = reply["saved"]
        return result

    def transcribe(self, name: str, samples: Any, sample_rate: int = 16000, **options: Any) -> dict[str, Any]:
        """Transcribe mono ``samples`` with the deployed Whisper artifact ``name`` on the device;
        text, segments (with tokens and timestamps) and timings, as `edgert transcribe --json` prints."""
        import numpy as np

        data = np.ascontiguousarray(samples, "<f4").tobytes()
        reply, _ = self.request({"op": "transcribe", "name": name, "sample_rate": sample_rate, **options}, data)
        return reply

    def codec_roundtrip(self, name: str, audio: Any, **options: Any) -> tuple[dict[str, Any], Any, Any]:
        """Encode and decode ``audio`` (mono, at the codec's rate) with the deployed codec ``name`` on the
        device (``stream=True``: in ``chunk_ms`` chunks); (facts and timings, codes, decoded audio)."""
        import numpy as np

        data = np.ascontiguousarray(audio, "<f4").tobytes()
        reply, payload = self.request({"op": "codec_roundtrip", "name": name, **options}, data)
        split = int(reply["codes_bytes"])
        codes = np.frombuffer(payload[:split], "<i4").reshape(reply["codes_shape"])
        return reply, codes, np.frombuffer(payload[split:], "<f4")

    def fetch(self, path: str) -> bytes:
        """A file from the agent's folder (e.g. a saved profile under results/)."""
        data = bytearray()
        while True:
            reply, block = self.request({"op": "fetch", "path": path, "offset": len(data), "length": CHUNK})
            data += block
            if not block or len(data) >= reply["size"]:
                return bytes(data)

    def close(self) -> None:
        """Close the link."""
        self.channel.close()

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
