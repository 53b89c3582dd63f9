"""pipeline/cache/lock.py: one writer per cache, never a stale lock."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pipeline.cache import WriterLock
from pipeline.errors import TransferError
from tests.conftest import ROOT


def test_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path):
    out = str(tmp_path / "x.h5")
    other = ("import sys; sys.path.insert(0, %r)\n"
             "from pipeline.cache import WriterLock\n"
             "from pipeline.errors import TransferError\n"
             "try:\n    WriterLock(%r).__enter__(); print('acquired')\n"
             "except TransferError as e:\n    print(e)\n") % (str(ROOT), out)
    with WriterLock(out):
        in_other_process = subprocess.run([sys.executable, "-c", other], capture_output=True, text=True)
        assert f"another extract (pid {os.getpid()}) is writing {out}" in in_other_process.stdout
        with pytest.raises(TransferError, match="another extract .* is writing"):
            with WriterLock(out):  # and in this same process
                pass
    in_other_process = subprocess.run([sys.executable, "-c", other], capture_output=True, text=True)
    assert in_other_process.stdout.strip() == "acquired"  # released: free again
    with WriterLock(out):
        pass
    assert not (tmp_path / "x.h5.lock").exists()
