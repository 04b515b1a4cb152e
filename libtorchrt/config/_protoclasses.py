"""Message classes from a serialized ``.proto`` descriptor, on any protobuf runtime (runs
wherever ``model_config_pb2`` is imported).

protoc's Python output ("gencode") checks when imported that the protobuf runtime is no
older than the protoc that made it (``runtime_version.ValidateProtobufRuntimeVersion``,
since protobuf 5.26): gencode from a 7.35 protoc refuses protobuf 7.34, and the 5.x and
6.x that other packages pin (``tritonclient[grpc]`` needs ``protobuf<7``). What gencode
does at import is register a serialized ``FileDescriptorProto`` and make a class per
message; :func:`build_module` does the same with calls that protobuf 4.21 to 7.x all have,
so the generated module (the serialized descriptor and one call here) pins no version.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from google.protobuf import descriptor_pool, message_factory, symbol_database
from google.protobuf.descriptor import Descriptor, FileDescriptor
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper
from google.protobuf.message import Message


def build_module(serialized: bytes, module: str, namespace: dict[str, Any]) -> FileDescriptor:
    """Define in ``namespace`` the names protoc's gencode would: a class per message (nested
    messages as class attributes, nested enums and their values too), an ``EnumTypeWrapper``
    per top-level enum and a constant per top-level enum value.

    Like gencode, it registers the descriptor in protobuf's default pool and the classes in
    the default symbol database (which pickling a nested message looks the class up in).
    No other package's ``.proto`` clashes there: the file is named
    ``libtorchrt/config/model_config.proto`` and its package is ``libtorchrt.inference``
    (Triton's own, in tritonclient, is ``model_config.proto`` in package ``inference``).

    Args:
        serialized: a serialized ``FileDescriptorProto``; the files it imports must be in
            the default pool already (their modules imported first).
        module: the module the names are defined in (``__module__`` of the classes).
        namespace: that module's ``globals()``.

    Returns:
        The file's descriptor (gencode's ``DESCRIPTOR``).

    Raises:
        TypeError: the pool already has a different file of that name or a symbol of it.
    """
    pool = descriptor_pool.Default()
    file = pool.AddSerializedFile(serialized)
    if hasattr(message_factory, "GetMessageClass"):  # protobuf >= 4.22
        get_class: Callable[[Descriptor], type[Message]] = message_factory.GetMessageClass
    else:  # protobuf 4.21
        get_class = message_factory.MessageFactory(pool).GetPrototype
    for enum in file.enum_types_by_name.values():
        namespace[enum.name] = EnumTypeWrapper(enum)
        for value in enum.values:
            namespace[value.name] = value.number
    for message in file.message_types_by_name.values():
        namespace[message.name] = _message_class(message, get_class, module, message.name)
    return file


def _message_class(
    message: Descriptor, get_class: Callable[[Descriptor], type[Message]], module: str, qualname: str
) -> type[Message]:
    cls = symbol_database.Default().RegisterMessage(get_class(message))
    # The runtime's metaclass adds nested enums and their values; nested messages are
    # attributes because gencode makes them so (``pb.ModelWarmup.Input``).
    for nested in message.nested_types:
        setattr(cls, nested.name, _message_class(nested, get_class, module, f"{qualname}.{nested.name}"))
    # As gencode's, so that reprs and pickle find the class by its name.
    cls.__module__ = module
    cls.__qualname__ = qualname
    return cls
