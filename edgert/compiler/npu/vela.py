"""Compile int8 TFLite partitions for Arm Ethos-U with Vela, and read its estimates.

Vela (``pip install ethos-u-vela``, compile time only) rewrites a TFLite model so that the ops
it supports become one ``ethos-u`` custom op holding the NPU command stream; what it cannot
place stays as TFLite ops for the Cortex-M (TFLite Micro). Its performance model gives cycles
per layer and in total, SRAM and flash use: these are *Vela's estimates*, not measurements.
The NPU clock is the target's (a config file inheriting Arm's system config overrides it).
"""

from __future__ import annotations

import csv
import importlib.util
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgert.errors import EdgertError

INSTALL = "pip install ethos-u-vela"
ACCELERATORS = (
    "ethos-u55-32",
    "ethos-u55-64",
    "ethos-u55-128",
    "ethos-u55-256",
    "ethos-u65-256",
    "ethos-u65-512",
    "ethos-u85-128",
    "ethos-u85-256",
    "ethos-u85-512",
    "ethos-u85-1024",
    "ethos-u85-2048",
)


class VelaError(EdgertError):
    """Vela is missing, or refused a model (the message carries Vela's reason)."""


@dataclass
class VelaLayer:
    """One row of Vela's per-layer estimate."""

    original_op: str
    op: str
    target: str  # NPU or CPU
    name: str
    cycles: int
    macs: int
    latency_us: float


@dataclass
class VelaReport:
    """What Vela says about one compiled partition (estimates, labelled as such)."""

    accelerator: str
    system_config: str
    memory_mode: str
    clock_hz: float
    npu_ops: int
    cpu_ops: int
    cpu_op_reasons: list[str] = field(default_factory=list)
    sram_bytes: float = 0.0
    flash_bytes: float = 0.0
    dram_bytes: float = 0.0
    cycles_total: int = 0
    latency_ms: float = 0.0
    macs: int = 0
    layers: list[VelaLayer] = field(default_factory=list)
    source: str = "Vela's performance estimate (not a measurement)"

    @property
    def npu_op_share(self) -> float:
        total = self.npu_ops + self.cpu_ops
        return self.npu_ops / total if total else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["npu_op_share"] = self.npu_op_share
        return d


def vela_command() -> list[str] | None:
    """How to run Vela here: this interpreter's ``ethosu.vela`` module, or None when missing."""
    if importlib.util.find_spec("ethosu") is None or importlib.util.find_spec("ethosu.vela") is None:
        return None
    return [sys.executable, "-m", "ethosu.vela"]


def _config_file(folder: Path, system_config: str, clock_hz: float | None) -> tuple[list[str], str]:
    """Vela arguments selecting ``system_config``, its clock replaced by ``clock_hz``."""
    args = ["--config", "Arm/vela.ini"]
    if not clock_hz:
        return args, system_config
    ini = folder / "edgert_target.ini"
    ini.write_text(
        f"[System_Config.edgert_target]\ninherit=System_Config.{system_config}\ncore_clock={float(clock_hz)!r}\n"
    )
    return [*args, "--config", str(ini)], "edgert_target"


def compile_for_ethos_u(
    model: bytes,
    accelerator: str,
    clock_hz: float | None = None,
    system_config: str = "Ethos_U55_High_End_Embedded",
    memory_mode: str = "Shared_Sram",
    name: str = "partition",
    extra_args: tuple[str, ...] = (),
) -> tuple[bytes, VelaReport]:
    """Vela's output model and its report for one int8 TFLite partition."""
    cmd = vela_command()
    if cmd is None:
        raise VelaError(f"Arm's Vela compiler is not installed; it is needed to compile for Ethos-U ({INSTALL})")
    if accelerator not in ACCELERATORS:
        raise VelaError(f"unknown Ethos-U configuration '{accelerator}' (known: {', '.join(ACCELERATORS)})")
    with tempfile.TemporaryDirectory(prefix="edgert-vela-") as tmp:
        folder = Path(tmp)
        src = folder / f"{name}.tflite"
        src.write_bytes(model)
        cfg, sys_name = _config_file(folder, system_config, clock_hz)
        out = folder / "out"
        argv = [
            *cmd,
            str(src),
            "--accelerator-config",
            accelerator,
            *cfg,
            "--system-config",
            sys_name,
            "--memory-mode",
            memory_mode,
            "--output-dir",
            str(out),
            "--verbose-performance",
            "--show-cpu-operations",
            *extra_args,
        ]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=3600)
        text = proc.stdout + proc.stderr
        compiled = out / f"{name}_vela.tflite"
        if proc.returncode != 0 or not compiled.is_file():
            raise VelaError(f"Vela refused '{name}' for {accelerator}: {_reason(text)}")
        report = parse_reports(out, name, text, accelerator, system_config, memory_mode)
        return compiled.read_bytes(), report


def _reason(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errs = [ln for ln in lines if re.search(r"error|exception|not supported|unsupported", ln, re.I)]
    return " | ".join((errs or lines)[-4:]) or "no output"


def parse_reports(
    out: Path, name: str, text: str, accelerator: str, system_config: str, memory_mode: str
) -> VelaReport:
    """Read Vela's summary CSV, per-layer CSV and console lines (CPU/NPU op counts, reasons)."""
    summaries = sorted(out.glob(f"{name}_summary_*.csv"))
    summary = next(csv.DictReader(summaries[0].open())) if summaries else {}
    clock = float(summary.get("core_clock", 0) or 0)
    layers = []
    per_layer = out / f"{name}_per-layer.csv"
    if per_layer.is_file():
        for row in csv.DictReader(per_layer.open()):
            cycles = int(float(row.get("Op Cycles", 0) or 0))
            layers.append(
                VelaLayer(
                    row.get("Original Operator", ""),
                    row.get("NNG Operator", ""),
                    row.get("Target", ""),
                    row.get("Name", ""),
                    cycles,
                    int(float(row.get("MAC Count", 0) or 0)),
                    cycles / clock * 1e6 if clock else 0.0,
                )
            )
    counts = {k: int(v) for k, v in re.findall(r"^(CPU|NPU) operators = (\d+)", text, re.M)}
    reasons = [
        ln.strip()
        for ln in text.splitlines()
        if re.search(r"placing on cpu|cpu only|is not supported|Unsupported", ln, re.I)
    ]
    kib = 1024.0
    cycles_total = int(float(summary.get("cycles_total", 0) or 0))
    return VelaReport(
        accelerator=accelerator,
        system_config=system_config,
        memory_mode=memory_mode,
        clock_hz=clock,
        npu_ops=counts.get("NPU", 0),
        cpu_ops=counts.get("CPU", 0),
        cpu_op_reasons=reasons,
        sram_bytes=float(summary.get("sram_memory_used", 0) or 0) * kib,
        flash_bytes=(
            float(summary.get("off_chip_flash_memory_used", 0) or 0)
            + float(summary.get("on_chip_flash_memory_used", 0) or 0)
        )
        * kib,
        dram_bytes=float(summary.get("dram_memory_used", 0) or 0) * kib,
        cycles_total=cycles_total,
        latency_ms=cycles_total / clock * 1e3 if clock else 0.0,
        macs=int(float(summary.get("nn_macs", 0) or 0)),
        layers=layers,
    )


def compile_for_target(model: bytes, target, name: str = "partition") -> tuple[bytes, VelaReport]:
    """``compile_for_ethos_u`` with the accelerator, clock, system config and memory mode of a target."""
    npu = target.npu
    if not npu.get("accelerator"):
        raise VelaError(f"target '{target.name}' names no Ethos-U accelerator (its [npu] table has no 'accelerator')")
    return compile_for_ethos_u(
        model,
        npu["accelerator"],
        npu.get("clock_hz"),
        npu.get("system_config", "Ethos_U55_High_End_Embedded"),
        npu.get("memory_mode", "Shared_Sram"),
        name,
    )
