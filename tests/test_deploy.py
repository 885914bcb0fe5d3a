"""The `local` device link: verified, atomic deployment into a folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from edgert.deploy import LocalDevice
from edgert.errors import ArtifactError
from edgert.runtime import open_artifact


@pytest.mark.slow
def test_local_deploy_copies_a_verified_artifact(smollm_artifact: Path, tmp_path: Path) -> None:
    device = LocalDevice(tmp_path / "device")
    dest = device.deploy(smollm_artifact)
    assert dest == tmp_path / "device" / smollm_artifact.name
    assert open_artifact(dest).manifest["files"] == open_artifact(smollm_artifact).manifest["files"]
    assert [p.name for p in (tmp_path / "device").iterdir()] == [smollm_artifact.name]


@pytest.mark.slow
def test_local_deploy_refuses_a_corrupt_artifact_and_keeps_the_old_one(smollm_artifact: Path, tmp_path: Path) -> None:
    device = LocalDevice(tmp_path / "device")
    good = device.deploy(smollm_artifact)
    before = good.stat().st_mtime_ns
    bad = tmp_path / smollm_artifact.name
    shutil.copyfile(smollm_artifact, bad)
    with bad.open("r+b") as fh:  # flip a byte inside the last member (the tokenizer)
        fh.seek(-4096, 2)
        byte = fh.read(1)
        fh.seek(-4096, 2)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ArtifactError, match="sha256"):
        device.deploy(bad)
    assert good.stat().st_mtime_ns == before
    open_artifact(good)  # the deployed one still verifies
    assert [p.name for p in (tmp_path / "device").iterdir()] == [smollm_artifact.name]
