"""What a model file is, when TorchScript cannot load it (worker process).

``torch.jit.load`` answers every file that is not TorchScript with the same message
("... your checkpoint file is corrupted"), which sends users looking for disk errors
when they handed over a ``torch.save`` checkpoint or a ``torch.export`` package. This
looks inside the file (a zip, or not) and says what it is and what to do instead.
"""

from __future__ import annotations

import os
import zipfile

__all__ = ["describe"]


def describe(path: str | os.PathLike[str]) -> str | None:
    """What ``path`` holds, when it is recognisably not TorchScript (None: no idea).

    Reads only the file's head or its zip directory; never unpickles anything.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return None
    if not zipfile.is_zipfile(path):
        if head[:1] == b"\x80":  # a pickle's PROTO opcode
            return (
                "a pickle (torch.save with the legacy format, or pickle.dump), not TorchScript; "
                "save the model with torch.jit.script(model).save(path)"
            )
        return f"not a TorchScript archive (not a zip file; it starts with {head!r})"
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (OSError, zipfile.BadZipFile):
        return None
    inner = {name.split("/", 1)[1] for name in names if "/" in name}
    if any("aotinductor" in n for n in inner):
        return (
            "an AOTInductor package (torch._inductor.aoti_compile_and_package), not TorchScript; "
            "libtorchrt serves TorchScript models for now"
        )
    if any(n.startswith(("models/", "archive_format")) for n in inner):
        return (
            "a torch.export program (torch.export.save), not TorchScript; "
            "libtorchrt serves TorchScript models for now"
        )
    if "data.pkl" in inner and "constants.pkl" not in inner and not any(n.startswith("code/") for n in inner):
        return (
            "a torch.save checkpoint (a state dict or a pickled module), not TorchScript; "
            "load it into its nn.Module and save that with torch.jit.script(model).save(path)"
        )
    return None
