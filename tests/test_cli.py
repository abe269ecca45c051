import subprocess
import sys

from bnstudy import __version__


def test_help_and_version():
    help_out = subprocess.run([sys.executable, "-m", "bnstudy", "--help"], capture_output=True, text=True)
    assert help_out.returncode == 0 and "compare" in help_out.stdout and "bench" in help_out.stdout
    version = subprocess.run([sys.executable, "-m", "bnstudy", "--version"], capture_output=True, text=True)
    assert version.stdout.strip() == f"bnstudy {__version__}"


def test_compare_of_a_non_run_is_one_line_error(tmp_path):
    done = subprocess.run([sys.executable, "-m", "bnstudy", "compare", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"bnstudy: error: {tmp_path}: not a run directory (no config.json); pass runs/NAME written by train_cifar.py"
    ]
