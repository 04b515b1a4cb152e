"""Server mode: a ``Pool`` served to other processes and machines (server process).

``libtorchrt-pool --model-repository DIR`` (also ``python -m libtorchrt.pool``) loads a
repository into a :class:`~libtorchrt.Pool` and serves it::

    tritonclient.http, curl, a load balancer ──HTTP──► http.py (KServe v2, ASGI on uvicorn)
    tritonclient.grpc ────────────────────gRPC──────► grpc_server.py (grpc.aio)│
    libtorchrt.Client ──────────────────ZeroMQ──────► zmq_frontend.py          │
    Prometheus ─────────────────────────HTTP────────► metrics.py               ▼
                                                                     Pool.submit ──► workers

One module per concept: ``cli.py`` (options), ``service.py`` (listen, load, serve,
drain), ``http.py`` (the HTTP application), ``grpc_server.py`` (the gRPC service, over
``grpc_codec.py`` and ``grpc_service.proto``), ``serving.py`` (what HTTP and gRPC share:
lookups, in-flight slots, health), ``control.py`` (model control: the repository index,
loads and unloads, polling; its HTTP endpoints ``http_repository.py``), ``kserve.py``
(the tensor codec and data types),
``metadata.py`` (server/model metadata, config, statistics documents), ``metrics.py``
(Prometheus), ``progress.py`` (start-up display), ``security.py`` (addresses, tokens,
keys), ``zmq_frontend.py`` (ZeroMQ: the frontend and its thread, over
``zmq_endpoint.py``, ``zmq_sessions.py``, ``zmq_handoff.py`` and ``zmq_requests.py``).
Importing this package imports none of them.
"""
