"""Running the course's scripts as a user would: shared by tests/test_train_cli.py and tests/test_grpo.py."""
import os
import re
import signal
import subprocess
import sys

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # one thread: identical arithmetic in every run


def kill_when(args, cwd, pattern: str) -> None:
    """Run the script and `kill -9` it as soon as a log line matches `pattern` (after a save, in the tests)."""
    victim = subprocess.Popen([sys.executable, *map(str, args)], cwd=cwd, env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    for line in victim.stdout:
        if re.match(pattern, line):
            victim.send_signal(signal.SIGKILL)
            break
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL, "the run finished before it could be killed"
