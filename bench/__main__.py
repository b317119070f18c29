"""`python -m bench [--quick] [--only train,moe,decode,context,memory,gpu] [--no-compile]`: see bench/README.md."""
import os

# Before torch loads OpenMP (set for both implementations alike; see README "Threads").
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from bench.run import main  # noqa: E402

main()
