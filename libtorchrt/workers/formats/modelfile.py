"""What a model file is, when its loader cannot load it (worker process).

``torch.jit.load`` answers every file that is not TorchScript with the same message
("... your checkpoint file is corrupted"), which sends users looking for disk errors
when they handed over a ``torch.save`` checkpoint or a ``torch.export`` package, or
named the wrong format. This looks inside the file (a zip, or not) and says what it
is and what to do instead.
"""

from __future__ import annotations

import os

from ...config.formats import zip_kind

__all__ = ["describe"]

_ADVICE = {
    "aoti": "an AOTInductor package (torch._inductor.aoti_compile_and_package), not TorchScript; "
    "serve it as format 'aoti' (platform: \"torch_aoti\" in config.pbtxt)",
    "exported": "a torch.export program (torch.export.save), not TorchScript; "
    "serve it as format 'exported' (or leave the format out: it is found from the file)",
    "checkpoint": "a torch.save checkpoint (a state dict or a pickled module), not TorchScript; "
    "serve its nn.Module as a model.py with the state dict as model.pt (format 'python'), "
    "or save it with torch.jit.script(model).save(path)",
}


def describe(path: str | os.PathLike[str]) -> str | None:
    """What ``path`` holds, when it is recognisably not TorchScript (None: no idea).

    Reads only the file's head or its zip directory; never unpickles anything.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return None
    kind = zip_kind(path)
    if kind is None:
        if head[:2] == b"PK":
            return "a zip file that is neither TorchScript nor a PT2 archive (truncated or corrupt?)"
        if head[:1] == b"\x80":  # a pickle's PROTO opcode
            return (
                "a pickle (torch.save with the legacy format, or pickle.dump), not TorchScript; "
                "save the model with torch.jit.script(model).save(path), or serve it as a model.py"
            )
        return f"not a TorchScript archive (not a zip file; it starts with {head!r})"
    return _ADVICE.get(kind)
