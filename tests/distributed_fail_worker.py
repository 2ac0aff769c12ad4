"""A torchrun worker for tests/test_distributed.py: the real `python -m tuneqdm_train` command, except that on
rank $TUNEQDM_TEST_FAIL_RANK the training loss raises at its $TUNEQDM_TEST_FAIL_CALL-th call (after printing
the time, so the test can tell how long the other rank took to stop)."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tuneqdm_train import __main__ as cli  # noqa: E402
from tuneqdm_train import trainer  # noqa: E402

FAIL_RANK = int(os.environ["TUNEQDM_TEST_FAIL_RANK"])
FAIL_CALL = int(os.environ["TUNEQDM_TEST_FAIL_CALL"])
_build_loss = trainer.build_loss


def failing_loss(*args, **kwargs):
    loss = _build_loss(*args, **kwargs)
    calls = 0

    def loss_fn(x0, t, cond):
        nonlocal calls
        calls += 1
        if calls == FAIL_CALL:
            print(f"INJECTED_FAILURE_AT {time.time():.3f}", file=sys.stderr, flush=True)
            raise RuntimeError("injected failure for the test")
        return loss(x0, t, cond)

    return loss_fn


if int(os.environ.get("RANK", "0")) == FAIL_RANK:
    trainer.build_loss = failing_loss

if __name__ == "__main__":
    sys.exit(cli.main())
