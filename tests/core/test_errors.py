"""How a SIGTERM ends a run: ``sigterm_exits`` (used by curation and by the TrainJob launcher)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from deepmedix.errors import sigterm_exits


def test_sigterm_inside_the_block_raises_systemexit_runs_finally_and_restores_the_handler():
    before = signal.getsignal(signal.SIGTERM)
    cleaned = []
    with pytest.raises(SystemExit) as exc:
        with sigterm_exits():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # the handler raises as soon as the signal arrives
            finally:
                cleaned.append(True)
    assert exc.value.code == 128 + signal.SIGTERM
    assert cleaned == [True]
    assert signal.getsignal(signal.SIGTERM) is before


def test_outside_the_main_thread_it_changes_nothing():
    before = signal.getsignal(signal.SIGTERM)
    seen = []

    def body():
        with sigterm_exits():
            seen.append(signal.getsignal(signal.SIGTERM))

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert seen == [before]
