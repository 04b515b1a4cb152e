"""The front: everything of the pool that runs in the caller's process.

Its file list is its architecture (imports go down this list, never up)::

    pool.py        Pool, the facade: start, infer / submit / infer_async, snapshots, close
    catalog.py     which configurations the pool serves (repository, load(name)) and
                   the models that failed to load
    admission.py   a request's way in (caller threads): lookup, checks, binding, placement
    binding.py     the callers' inputs bound to the model's arguments and checked
    queues.py      a model's waiting requests: FIFO, the batcher (batcher.py,
                   batch.py), or the sequences (sequences.py), behind one interface
    router.py      the router thread: its loop, dispatch to workers, and sends
    control.py     models loaded, loaded anew and unloaded while the pool serves
    replies.py     workers' answers turned into callers' outputs and errors
    supervisor.py  worker processes: spawn, READY, warm-up, exit, re-send, backoff
    snapshots.py   health(), workers(), models() read from the records (any thread)
    records.py     the records the router keeps: models, instance slots, workers
    call.py        one request on its way: placement, future, deadline, retries
    future.py      the futures callers wait on
    stats.py       per-model counters;  gpu.py  CUDA buffers for CUDA tensors
"""
