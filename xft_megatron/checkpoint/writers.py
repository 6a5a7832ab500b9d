"""Megatron's checkpoint writer starts no process of its own during our saves.

A torch_dist save (`dist_checkpointing.save`, synchronous here) writes its buckets from this
process (`FileSystemWriterAsync.write_preloaded_data_multithread`, megatron-core 0.19.2: the
calling thread writes the last bucket, threads of this process the others; with the default
`thread_count=1` there is one bucket, so no thread either), so Ctrl-C interrupts the write
itself and a killed trainer takes its writes with it. For their results Megatron still
starts, once per process, a spawned `multiprocessing.Manager` server
(`get_write_results_queue`), a process that would outlive a killed trainer. Around each
save, `guarded()` hands Megatron an in-process queue instead (the writer threads report to a
queue of their own; only the calling thread reads and writes this one), so no manager process
exists.
"""

import contextlib
import queue

from megatron.core.dist_checkpointing.strategies import filesystem_async


@contextlib.contextmanager
def guarded():
    """Run one checkpoint save with its write results in an in-process queue."""
    real = filesystem_async.get_write_results_queue
    filesystem_async.get_write_results_queue = queue.Queue
    try:
        yield
    finally:
        filesystem_async.get_write_results_queue = real
