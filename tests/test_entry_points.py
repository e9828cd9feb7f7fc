"""The README's commands, the CLI and the benchmark run as a newcomer would run them."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from volume_ray.cli import main
from volume_ray.estimators import VOLUME_COLUMNS
from volume_ray.measure import RADII_COLUMNS

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    block = re.search(
        r"## Two commands.*?```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S
    )
    return [line for line in block.group(1).splitlines() if line and not line.startswith("#")]


def test_ci_runs_the_readme_test_command():
    install_and_run, install_and_test = readme_commands()
    assert install_and_run.endswith("volume-ray run sweeps/digits_data_scaling.yaml")
    assert install_and_test in (ROOT / ".ci" / "run").read_text()


def test_the_readme_main_job_runs_end_to_end(tmp_path):
    """The README's main command, with the results in a temporary folder."""
    command = readme_commands()[0].split("&&")[1].split() + ["--storage", str(tmp_path)]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "log-volume (loss threshold 0.1)" in run.stdout
    volumes = pd.read_parquet(tmp_path / "digits-data-scaling" / "volumes.parquet")
    assert len(volumes) == 30 * 3  # (model, landscape) pairs x estimators
    assert set(volumes.estimator) == {"paper", "typical", "laplace"}
    assert volumes.log_volume.notna().all()
    assert "typical (every one of 500 directions)" in run.stdout


def test_demo_writes_the_tables(tmp_path, capsys):
    code = main(
        ["demo", "--directions", "4", "--hidden", "16", "--epochs", "30", "--thresholds", "5.0",
         "--out", str(tmp_path)]
    )  # fmt: skip
    assert code == 0
    radii = pd.read_parquet(tmp_path / "radii.parquet")
    volumes = pd.read_parquet(tmp_path / "volumes.parquet")
    assert list(radii.columns) == RADII_COLUMNS and len(radii) == 4
    assert list(volumes.columns) == VOLUME_COLUMNS and len(volumes) == 2
    assert "log_volume" in capsys.readouterr().out


def test_demo_rejects_bad_numbers(capsys):
    code = main(
        ["demo", "--directions", "2", "--hidden", "8", "--epochs", "1", "--thresholds", "-1"]
    )
    assert code == 2
    assert "thresholds" in capsys.readouterr().err


@pytest.mark.parametrize(
    "script,prints",
    [
        ("bench_radius_search.py", "speed-up per direction"),
        ("bench_training.py", "samples/s"),
        ("bench_workers.py", "per-shard overhead"),
        ("bench_cluster.py", "overhead of crossing nodes"),
        ("bench_estimators.py", "curvature cost"),
    ],
)
def test_benchmarks_run(script, prints):
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--smoke"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert prints in run.stdout


def test_gpu_check_says_in_one_line_that_there_is_no_cuda():
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert run.stdout.strip() == (
        "gpu_check: CUDA is not available on this machine; run it where a GPU is."
    )


def test_keep_dashboard_holds_the_local_ray_until_ctrl_c(tmp_path):
    """A run with --keep-dashboard prints the dashboard's URL and how to sign in, its
    results, then keeps the local Ray up (the dashboard answers) until SIGINT."""
    import signal
    import time
    from urllib.error import HTTPError
    from urllib.request import urlopen

    command = ["volume-ray", "run", str(ROOT / "sweeps" / "swiss_roll.yaml"), "--smoke",
               "--storage", str(tmp_path), "--keep-dashboard"]  # fmt: skip
    run = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    lines, url = [], None
    try:
        for line in run.stdout:
            lines.append(line)
            if line.startswith("Ray dashboard: "):
                url = line.split()[2]
                assert "`ray get-auth-token`" in line
            if "stay up; Ctrl-C to stop" in line:
                break
        assert url is not None and any("Read the tables in Python" in x for x in lines), lines
        time.sleep(2)
        assert run.poll() is None  # still up after the results
        try:
            status = urlopen(url, timeout=10).status
        except HTTPError as refused:  # token authentication: up, and asking who we are
            status = refused.code
        assert status in (200, 401, 403)
        run.send_signal(signal.SIGINT)
        assert run.wait(timeout=60) == 0
        assert "stopping the local Ray" in run.stdout.read()
    finally:
        if run.poll() is None:
            run.kill()
