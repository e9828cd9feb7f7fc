"""Freed memory kept for reuse: measured by the page faults a process takes."""

import subprocess
import sys
from pathlib import Path

import pytest

from volume_ray.allocator import SWITCH, keep_freed_memory

# 48 MiB temporaries: above the 32 MiB that glibc's adaptive mmap threshold can reach,
# so by default every one is mmapped and its pages faulted in anew, whatever came before.
FAULTS = """
import resource, torch
{setup}
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2):  # warm up: the first passes fault their pages in either way
    (torch.ones(3072, 4096) * 2).sum()
before = faults()
for _ in range(ROUNDS):  # two 48 MiB temporaries per round, freed again
    (torch.ones(3072, 4096) * 2).sum()
print(faults() - before)
"""
ROUNDS = 20
PAGES = 48 * 1024 * 1024 // 4096  # of one temporary


def minor_faults(setup: str) -> int:
    script = FAULTS.replace("ROUNDS", str(ROUNDS)).format(setup=setup)
    return int(subprocess.run([sys.executable, "-c", script], capture_output=True, check=True,
                              text=True).stdout)  # fmt: skip


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc is Linux's")
def test_kept_memory_stops_passes_from_faulting_their_pages_in_again():
    default = minor_faults("")
    kept = minor_faults(
        "from volume_ray.allocator import keep_freed_memory\nassert keep_freed_memory()"
    )
    assert default >= ROUNDS * 2 * PAGES  # every temporary faulted in anew
    assert kept <= 4 * PAGES  # a region faulted in once more at most, not one per round


def test_keep_freed_memory_says_whether_it_applied():
    assert keep_freed_memory() is sys.platform.startswith("linux")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc is Linux's")
def test_commands_that_neither_train_nor_measure_leave_malloc_alone():
    spec = Path(__file__).resolve().parents[1] / "sweeps" / "digits_data_scaling.yaml"
    validated = minor_faults(
        "import contextlib, io\nfrom volume_ray.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    assert main(['validate', r'{spec}']) == 0"
    )
    assert validated >= ROUNDS * 2 * PAGES  # glibc's default: every temporary faulted in


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc is Linux's")
def test_the_environment_switch_turns_it_off():
    switched = minor_faults(
        f"import os\nos.environ['{SWITCH}'] = '0'\n"
        "from volume_ray.allocator import keep_freed_memory\nassert not keep_freed_memory()"
    )
    assert switched >= ROUNDS * 2 * PAGES
