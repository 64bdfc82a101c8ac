"""retain_freed_memory: large tensors freed and allocated again stop costing page faults."""

import os
import platform
import subprocess
import sys

import pytest

from micronet.allocator import RETAIN_FREED_MEMORY_ENV

_PROBE = """
import resource, sys, torch
from micronet.allocator import retain_freed_memory
changed = retain_freed_memory()
for _ in range(20):
    torch.empty(16 * 2**20).fill_(1.0)  # 64 MiB, above glibc's largest mmap threshold
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    torch.empty(16 * 2**20).fill_(1.0)
print(changed, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="mallopt tuning exists on glibc only (elsewhere the function is a no-op)")


def _faults(retain: bool) -> tuple[str, int]:
    env = {**os.environ, RETAIN_FREED_MEMORY_ENV: "1" if retain else "0"}
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    changed, faults = out.stdout.split()
    return changed, int(faults)


@glibc_only
def test_freed_blocks_are_reused_without_page_faults():
    changed, retained = _faults(retain=True)
    unchanged, default = _faults(retain=False)
    assert (changed, unchanged) == ("True", "False")
    pages = 5 * 64 * 2**20 // 4096
    assert default >= pages // 2  # glibc maps and zeroes every 64 MiB block again
    assert retained <= pages // 20  # the freed block is reused


def test_the_micronet_command_retains_freed_memory(monkeypatch):
    import micronet.allocator as allocator
    import micronet.cli as cli

    calls = []
    monkeypatch.setattr(allocator, "retain_freed_memory", lambda: calls.append(True) or True)
    assert cli.main(["info", "--list"]) == 0
    assert calls == [True]
