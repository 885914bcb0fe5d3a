"""Hostile inputs: every parser refuses them with one EdgertError, within time and memory bounds.

`tools/fuzz.py` runs a seeded subset (200 cases per input kind) in one fresh process, so that the
kinds needing no TVM fork from a light worker; each kind then asserts no traceback, hang, crash
or memory blow-up. The regression tests below are the smallest cases of the failure classes the
fuzzer found, rebuilt here, each checked for its clean one-line error.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import load_tool, run_cli, run_tool

from edgert.errors import ArtifactError, EdgertError, ModelFileError

fuzz = load_tool("fuzz")
CASES = 200


@pytest.fixture(scope="module")
def campaign(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """The seeded subset of every target, run once by the tool itself."""
    out = tmp_path_factory.mktemp("fuzz") / "fuzz.json"
    proc = run_tool("fuzz", "all", "--cases", str(CASES), "--seed", "0", "--json", str(out))
    assert out.is_file(), proc.stderr[-3000:]
    return {r["target"]: r for r in json.loads(out.read_text())["results"]}


@pytest.mark.slow  # about 30 s for the eight kinds together
@pytest.mark.parametrize("target", list(fuzz.TARGETS))
def test_fuzz_subset_has_no_traceback_hang_crash_or_blowup(campaign: dict[str, dict], target: str) -> None:
    result = campaign[target]
    counts = result["counts"]
    assert sum(counts.values()) == CASES
    bad = {k: counts[k] for k in fuzz.BAD if counts[k]}
    assert not bad, f"{target}: {bad}; first failures: {result['failures'][:3]}"
    assert counts["error"] > 0  # the mutations do reach the checks
    assert result["multi_line_errors"] == 0
    mem = result["memory"]  # measured: a case's peak RSS growth, within 2 x input + the model's allowance
    assert mem["allowance_bytes"] >= fuzz.SLACK
    assert mem["max_growth_bytes"] <= fuzz.memory_bound(mem["max_growth_case_input_bytes"], mem["allowance_bytes"])


# -- regressions: the smallest cases of each class found ------------------------------------------------


def _wav(path: Path, rate: int = 16000, width: int = 2, body: bytes = b"\x10\x00" * 64, riff_extra: int = 0) -> Path:
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * width, width, 8 * width)
    data = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", len(body)) + body
    path.write_bytes(b"RIFF" + struct.pack("<I", len(data) + riff_extra) + data)
    return path


def test_wav_damage_is_an_audio_error(tmp_path: Path) -> None:
    from edgert.runtime.audio import AudioError, read_wav

    low = _wav(tmp_path / "1hz.wav", rate=1)  # once 8 GB while resampling
    with pytest.raises(AudioError, match=r"1 Hz, outside 1000\.\.384000"):
        read_wav(low)
    odd = _wav(tmp_path / "odd.wav", body=b"\x10" * 129)  # a frame cut short: numpy's ValueError
    assert read_wav(odd).source_rate == 16000
    # a chunk whose size runs past the end of the file: `wave` raises an empty RuntimeError
    bad = bytearray(_wav(tmp_path / "chunk.wav").read_bytes())
    bad[12:16] = b"LIST"
    (tmp_path / "chunk.wav").write_bytes(bytes(bad))
    with pytest.raises(AudioError, match=r"chunk\.wav is not a readable WAV file"):
        read_wav(tmp_path / "chunk.wav")


@pytest.mark.parametrize(
    "source, phrase",
    [
        ("{{ 'x' * 10000000000 }}", "repeats a value"),
        ("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}", "longer than"),
        ("{{ 10 ** 100000000 }}", "power"),
        ("{{ 'x'|center(10000000000) }}", "number over"),
        ("{% set ns = namespace(s='xx') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "over"),
        ("{{ '%99999999999s' % 'x' }}", "width"),
        ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "recurses"),
        ("{% if %}", "line 1"),
        ("{{ ''.__class__.__mro__ }}", "sandbox"),
        ("{{ raise_exception('no system role') }}", "no system role"),
        ("hello", "leaves the user's message out"),
    ],
)
def test_hostile_chat_templates_fail_fast(source: str, phrase: str) -> None:
    from edgert.runtime.chat_template import TemplateError, check_template

    start = time.monotonic()
    with pytest.raises(TemplateError, match="tpl: chat template") as info:
        check_template(source, "tpl")
    assert phrase in str(info.value) and "\n" not in str(info.value)
    assert time.monotonic() - start < 5


def _tiny_gguf(path: Path, **changes: object) -> Path:
    tool = load_tool("make_tiny_gguf")
    fields = fuzz.small_tokenizer_fields()
    for key, value in changes.items():
        fields[key] = (value, fields[key][1])
    return tool.write_tiny_llama(
        path, "F32", n_layers=1, hidden=16, heads=2, kv_heads=1, ffn=16, tokenizer_fields=fields
    )


@pytest.mark.parametrize(
    "key, value, phrase",
    [
        ("tokenizer.ggml.eos_token_id", 999999, "outside the vocabulary"),
        ("tokenizer.chat_template", "{{ 'x' * 10000000000 }}", "repeats a value"),
        ("tokenizer.chat_template", "{% for m in messages %}{{ m.content }", "chat template error"),
    ],
)
def test_gguf_special_ids_and_templates_checked_at_compile(
    tmp_path: Path, key: str, value: object, phrase: str
) -> None:
    from edgert.families.llama.config import read_source

    path = _tiny_gguf(tmp_path / "m.gguf", **{key: value})
    with pytest.raises(EdgertError, match=phrase) as info:
        read_source(path)
    assert str(path) in str(info.value)


def test_gguf_with_shapes_its_metadata_contradicts(tmp_path: Path) -> None:
    import gguf

    from edgert.families.llama.config import read_source

    path = _tiny_gguf(tmp_path / "m.gguf")
    reader = gguf.GGUFReader(path, "r+")
    reader.fields["llama.embedding_length"].parts[-1][0] = 32  # the tensors stay 16 wide
    del reader
    implied = r"token_embd.weight. has shape \[267, 16\], but the metadata implies \[267, 32\]"
    with pytest.raises(ModelFileError, match=implied):
        read_source(path)


def _artifact(tmp_path: Path, **members: bytes) -> Path:
    parts = {**fuzz.artifact_members(), **members}
    path = tmp_path / "a.edgert"
    path.write_bytes(fuzz.pack_artifact(parts))
    return path


def _open_all(path: Path) -> None:
    from edgert.artifact.reader import open_artifact
    from edgert.runtime.tokenizer import tokenizer_from_artifact

    art = open_artifact(path, check_host=False, trust_stamp=False)
    art.weights()
    tokenizer_from_artifact(art)


def test_artifact_damage_is_an_artifact_error(tmp_path: Path) -> None:
    weights = fuzz.artifact_members()["weights.safetensors"]
    (n,) = struct.unpack("<Q", weights[:8])
    head = json.loads(weights[8 : 8 + n])
    head["embed"]["dtype"] = "F64"  # once a KeyError
    blob = json.dumps(head).encode()
    cases = {
        "manifest.json": (b"[1, 2]", "JSON list, not an object"),  # once an AttributeError
        "weights.safetensors": (struct.pack("<Q", len(blob)) + blob + weights[8 + n :], "dtype 'F64'"),
        "tokenizer.json": (b'{"model": 1}', "not a readable tokenizer document"),  # once a bare Exception
    }
    for member, (data, phrase) in cases.items():
        with pytest.raises(ArtifactError, match=phrase):
            _open_all(_artifact(tmp_path, **{member: data}))


def test_fuzz_regressions_by_case_id(tmp_path: Path) -> None:
    """Cases the fuzzer found, replayed from their seed and index in a forked child: a flipped
    TFLite offset (struct.error), an ONNX Concat of an unnamed input (a segfault in TVM), a CT2
    variable of rank 65 (numpy's ValueError), a manifest.sha256 of invalid UTF-8, and a
    tokenizer.json whose merges make `tokenizers` panic (a BaseException), and a GGUF array whose
    count the file cannot hold (the gguf reader looped over empty slices: a hang)."""
    for name, seed, index in (
        ("tflite", 0, 0),
        ("onnx", 0, 72),
        ("ct2", 1, 2692),
        ("manifest", 1, 8),
        ("manifest", 1, 578),
    ):
        target = fuzz.TARGETS[name]()
        seeds = target.seeds(tmp_path)
        target.prepare()
        report = fuzz.run_case(target, fuzz.make_case(target, seeds, seed, index), tmp_path, 30.0, 1 << 30)
        assert report["outcome"] == "error", (name, index, report)


class _Greedy(fuzz.Target):
    """A parser that keeps 4 KiB per input byte, touched: what a declared count trusted too far does."""

    name, suffix = "greedy", ".bin"

    def parse(self, path: Path) -> object:
        held = np.ones(path.stat().st_size * 512, dtype=np.float64)
        return float(held.sum())


def test_peak_memory_past_the_bound_is_a_memory_outcome(tmp_path: Path) -> None:
    target = _Greedy()
    allow = fuzz.allowance(target, [fuzz.Seed(b"x" * 100)], tmp_path, 30.0, 1 << 30)  # 100 bytes: 400 KiB
    assert fuzz.SLACK <= allow < fuzz.SLACK + (8 << 20)
    small = fuzz.run_case(target, b"x" * 200, tmp_path, 30.0, 1 << 30, allow)  # 800 KiB: under the bound
    assert small["outcome"] == "accepted" and 0 < small["growth"] < allow
    big = fuzz.run_case(target, b"x" * 20_000, tmp_path, 30.0, 1 << 30, allow)  # 80 MiB from 20 KB
    assert big["outcome"] == "memory" and big["growth"] > 70 << 20
    assert "over the bound" in big["message"] and "was accepted" in big["message"]


def test_protocol_header_of_the_wrong_shape() -> None:
    from edgert.deploy.protocol import FrameError, decode_frame, encode_frame

    frame = bytearray(encode_frame({"op": "x"}))
    body = frame[:12] + b'["op", "x"]'
    body[4:8] = struct.pack(">I", 11)
    import zlib

    with pytest.raises(FrameError, match="JSON list"):
        decode_frame(bytes(body) + struct.pack(">I", zlib.crc32(bytes(body))))


def test_invalid_utf8_prompt_is_refused() -> None:
    from edgert.runtime.tokenizer import TextTokenizer

    doc = fuzz.artifact_members()["tokenizer.json"].decode()
    tok = TextTokenizer(doc, {})
    with pytest.raises(EdgertError, match="not valid UTF-8"):
        tok.encode(b"caf\xe9".decode("utf-8", "surrogateescape"))  # what Python makes of argv bytes
    with pytest.raises(EdgertError, match="not valid UTF-8"):
        tok.encode(b"caf\xe9")  # type: ignore[arg-type]
    assert tok.decode(tok.encode("the")) == "the"


def test_sampling_and_threads_refused_before_loading(tmp_path: Path) -> None:
    from edgert.runtime.sampling import SamplingParams

    for bad in ({"temperature": -1.0}, {"temperature": float("nan")}, {"repetition_penalty": float("inf")}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    missing = str(tmp_path / "none.edgert")  # refused before the artifact is even opened
    for args, phrase in ((["--threads", "100000"], "--threads 100000"), (["--threads", "-2"], "--threads -2")):
        proc = run_cli("run", missing, *args)
        assert proc.returncode == 2 and phrase in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_fuzz_cases_are_reproducible(tmp_path: Path) -> None:
    target = fuzz.TARGETS["ct2"]()
    seeds = target.seeds(tmp_path)
    cases = [fuzz.make_case(target, seeds, 3, i) for i in range(20)]
    assert cases == [fuzz.make_case(target, seeds, 3, i) for i in range(20)]
    assert len(set(cases)) > 10 and np.mean([c != seeds[0].data for c in cases]) > 0.9
