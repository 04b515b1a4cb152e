"""Transport: the wire format, ZeroMQ helpers and shared-memory arenas.

Knows nothing about models; used by the front and by the workers.
"""
