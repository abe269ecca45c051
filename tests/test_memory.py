"""``bnstudy.memory``: a process that retains freed memory takes no page faults when it allocates again what it
freed; one on glibc's defaults takes one per page. Each case runs in a fresh interpreter (the setting lasts for the
life of a process)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from bnstudy.memory import MALLOC_ENV

# What a training step does to the allocator, in miniature: activation-sized tensors (some beyond glibc's largest
# mmap threshold, 32 MiB) allocated, written and freed in the same order every step, a few alive at a time.
PROBE = """
import json, resource, torch
from bnstudy.memory import retain_freed_memory
setting = retain_freed_memory()
def step():
    alive = []
    for mib in (1, 3, 8, 17, 40, 2, 5, 12):
        block = torch.empty(mib << 20, dtype=torch.uint8)
        block.fill_(1)  # touch every page
        alive = [*alive[-2:], block]
def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() / 2**20
for _ in range(20):
    step()
faults, rss = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, rss_mib()
for _ in range(20):
    step()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
print(json.dumps({"setting": setting, "faults_per_step": faults / 20, "rss_growth_mib": rss_mib() - rss}))
"""
GLIBC = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting applies to glibc's malloc")


def _probe(malloc: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != MALLOC_ENV}
    if malloc is not None:
        env[MALLOC_ENV] = malloc
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


@GLIBC
def test_retained_memory_is_reused_without_page_faults_or_growth():
    retained, system = _probe(None), _probe("system")
    assert retained["setting"] == "retain" and system["setting"] == "system"
    # glibc's defaults fault in the large blocks again every step (huge pages, where the kernel gives them, fault
    # less); retained, a step reuses what the step before freed, and the process does not grow
    assert system["faults_per_step"] > (40 << 20) / os.sysconf("SC_PAGE_SIZE") / 1000, system
    assert retained["faults_per_step"] < system["faults_per_step"] / 20, (retained, system)
    assert retained["rss_growth_mib"] < 2, retained


def test_a_bad_setting_is_a_one_line_error():
    done = subprocess.run(
        [sys.executable, "-c", "from bnstudy.memory import retain_freed_memory; retain_freed_memory()"],
        env={**os.environ, MALLOC_ENV: "hoard"},
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0
    assert "BNSTUDY_MALLOC='hoard' is not an allocator setting; use one of retain, system" in done.stderr
