"""The CPU a benchmark ran on, as its report names it.

The model name alone ("AMD EPYC" on some VMs) hides the generation: a Zen 4 and a Zen 5 (CPU
family 25 and 26) with the same name gave the throughput benchmark different 8-over-1 ratios,
so the family and model numbers go with it where /proc/cpuinfo has them (Linux x86)."""

from __future__ import annotations

import platform
from pathlib import Path


def describe_cpu() -> str:
    """'AMD EPYC (CPU family 25, model 17)', or what `platform` knows off Linux."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if not key.strip():  # the end of the first processor's block
                break
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    if "model name" not in fields:
        return platform.processor() or platform.machine()
    cpu = fields["model name"]
    if "cpu family" in fields and "model" in fields:
        cpu += f" (CPU family {fields['cpu family']}, model {fields['model']})"
    return cpu
