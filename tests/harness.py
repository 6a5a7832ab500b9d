"""Run a test body on N gloo processes: spawn, free port, clean teardown, rerun on port clash.

    results = run_ranks(4, body, arg1, arg2)   # body(rank, world_size, *args) -> picklable

`body` must be a module-level function. Each rank gets RANK/WORLD_SIZE/MASTER_* in its
environment, one intra-op thread, and a hard timeout; a failure on any rank raises in the
test with that rank's traceback.

Ranks are forked from a forkserver that imported torch and Megatron once (importing them
costs several seconds per process on a small machine, and the suite starts about a hundred
ranks). The server itself never runs an operator or joins a process group, so what is forked
holds no threads or communicators; each rank gets the test process's environment as it is
when the ranks start, not the server's.
"""

import io
import multiprocessing as mp
import os
import queue
import socket
import traceback

PORT_CLASH = ("EADDRINUSE", "Address already in use", "address already in use")
# imported once by the forkserver (an import that fails there is only skipped)
PRELOAD = ["torch", "megatron.core", "megatron.core.dist_checkpointing",
           "megatron.core.models.gpt", "transformers", "xft_megatron.training.loop"]
_CTX = None


def _context():
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(PRELOAD)
    return _CTX


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent():
    """Linux: a rank gets SIGKILL when the test process dies (e.g. killed by a timeout), so
    no orphaned rank lingers in a collective."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker(rank, world_size, port, body, args, out, environ):
    _die_with_parent()
    os.environ.clear()  # the test process's, not the forkserver's
    os.environ.update(environ)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      OMP_NUM_THREADS="1")
    import torch

    torch.set_num_threads(1)
    try:
        result = body(rank, world_size, *args)
        # as bytes: a tensor put on the queue as is would be shared through a file
        # descriptor that dies with this process, possibly before the test reads it
        buf = io.BytesIO()
        torch.save(result, buf)
        out.put((rank, True, buf.getvalue()))
    except BaseException:  # report everything, including assertion failures
        out.put((rank, False, traceback.format_exc()))
    finally:
        from xft_megatron.runtime import parallel

        try:
            parallel.shutdown()
        except Exception:
            pass


class RankFailure(AssertionError):
    pass


def run_ranks(world_size, body, *args, timeout=600, retries=3):
    """Run `body(rank, world_size, *args)` on `world_size` processes; list of results."""
    for attempt in range(retries):
        ctx = _context()
        out = ctx.Queue()
        port = _free_port()
        procs = [ctx.Process(target=_worker, args=(r, world_size, port, body, args, out,
                                                   dict(os.environ)))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        results, errors = {}, {}
        try:
            for _ in range(world_size):
                rank, ok, value = out.get(timeout=timeout)
                if ok:
                    import torch

                    value = torch.load(io.BytesIO(value), weights_only=False)
                (results if ok else errors)[rank] = value
                if errors:
                    break
        except queue.Empty:
            errors[-1] = f"timed out after {timeout}s waiting for ranks " \
                         f"{sorted(set(range(world_size)) - set(results))}"
        finally:
            for p in procs:
                p.join(timeout=5 if not errors else 1)
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join()
        if errors and any(s in e for e in errors.values() for s in PORT_CLASH) \
                and attempt + 1 < retries:
            continue
        if errors:
            msg = "\n".join(f"--- rank {r} ---\n{e}" for r, e in sorted(errors.items()))
            raise RankFailure(f"distributed test body failed:\n{msg}")
        return [results[r] for r in range(world_size)]
