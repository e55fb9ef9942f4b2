"""torchrun with the ranks' exit code: `python scripts/launch.py [torchrun options] scripts/train.py [...]`.

torchrun exits 1 when a rank fails and when it is signalled itself, whatever its ranks returned, so a
scheduler that requeues a job on exit code 75 (preempted, its checkpoint committed) never sees 75 from it.
This runs torchrun (dist.torchrun, in this process: every option it has, its signal handling and its
30 s between passing SIGTERM on and SIGKILL) and, when torchrun fails, exits with the code that the node's
local rank 0 recorded on its way out (cli.run_training writes it to LDM_DDP_EXIT_FILE): 75, 3, 4, 5 as
docs/reliability.md lists them, else torchrun's own.
"""
from __future__ import annotations

import os
import sys
import tempfile

EXIT_FILE = "LDM_DDP_EXIT_FILE"


def record_exit(code: int) -> None:
    """Called by each rank as it leaves: local rank 0 writes its exit code where the launcher looks."""
    path = os.environ.get(EXIT_FILE)
    if path and os.environ.get("LOCAL_RANK", "0") == "0":
        try:
            with open(path, "w") as f:
                f.write(str(code))
        except OSError:
            pass  # the launcher falls back to torchrun's code


def main(argv: list[str]) -> int:
    from .dist import torchrun

    with tempfile.TemporaryDirectory(prefix="ldm_ddp_launch_") as folder:
        exit_file = os.path.join(folder, "exit_code")
        os.environ[EXIT_FILE] = exit_file  # the ranks inherit it
        try:
            torchrun(argv)
            return 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
        except BaseException:  # a rank failed (ChildFailedError) or torchrun was signalled (SignalException)
            if not os.path.exists(exit_file):  # no rank said why (or the launch itself broke): as torchrun
                raise
            code = 1
        try:
            with open(exit_file) as f:
                return int(f.read().strip() or code)
        except (OSError, ValueError):
            return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
