"""A registration that never returns, for baselines.Isolated's interruption test: it writes a
temporary file (as ANTs does), says where and in which process on stdout, then waits forever."""
import os
import tempfile
import threading


def register_timed(fixed, moving):
    handle, path = tempfile.mkstemp(prefix='stalled_')
    os.close(handle)
    print('pid {} temp file {}'.format(os.getpid(), path), flush=True)
    threading.Event().wait()
