"""Workers: the model-instance process (flags, loading, execution loop) and its launcher.

Uses :mod:`libtorchrt.transport`; knows nothing of the front's scheduling.
"""
