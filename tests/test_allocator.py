"""Freed memory kept for reuse: measured by the page faults a process takes."""

import subprocess
import sys

import pytest

from volume_ray.allocator import keep_freed_memory

FAULTS = """
import resource, torch
{setup}
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):  # warm up: the first passes fault their pages in either way
    (torch.ones(1024, 1024) * 2).sum()
before = faults()
for _ in range(50):  # three 4 MiB temporaries per round, freed again
    (torch.ones(1024, 1024) * 2).sum()
print(faults() - before)
"""


def minor_faults(setup: str) -> int:
    script = FAULTS.format(setup=setup)
    return int(subprocess.run([sys.executable, "-c", script], capture_output=True, check=True,
                              text=True).stdout)  # fmt: skip


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc is Linux's")
def test_kept_memory_stops_passes_from_faulting_their_pages_in_again():
    default = minor_faults("")
    kept = minor_faults(
        "from volume_ray.allocator import keep_freed_memory\nassert keep_freed_memory()"
    )
    assert default > 50 * 100  # each round faults hundreds of 4 KiB pages in anew
    assert kept < 50 * 64  # a stray fault at most, not one per temporary


def test_keep_freed_memory_says_whether_it_applied():
    assert keep_freed_memory() is sys.platform.startswith("linux")
