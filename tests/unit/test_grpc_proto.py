"""``grpc_service_pb2`` is what protoc makes of ``grpc_service.proto``, and its messages
and RPCs are Triton's on the wire: the same fields, numbers and types as tritonclient's
``service_pb2`` (and libtorchrt's ``ModelConfig`` a field-for-field subset of Triton's),
so that ``tritonclient.grpc`` reads what the server writes."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from libtorchrt.config import model_config_pb2
from libtorchrt.server import grpc_service_pb2 as pb

SERVER = Path(pb.__file__).parent
ROOT = SERVER.parent.parent
PROTO = "libtorchrt/server/grpc_service.proto"


def _stored() -> descriptor_pb2.FileDescriptorProto:
    """The descriptor as grpc_service_pb2.py stores it (the runtime may serialize it anew)."""
    tree = ast.parse((SERVER / "grpc_service_pb2.py").read_text())
    (data,) = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, bytes)]
    return descriptor_pb2.FileDescriptorProto.FromString(data)


def _stub_names(body: list[ast.stmt], owner: str = "") -> list[tuple[str, str, str]]:
    out: list[tuple[str, str, str]] = []
    for node in body:
        if isinstance(node, ast.ClassDef):
            out.append((owner, node.name, "class"))
            out += _stub_names(node.body, f"{owner}.{node.name}".lstrip("."))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out.append((owner, node.target.id, ast.unparse(node.annotation)))
    return out


def test_the_module_is_what_protoc_makes_of_the_proto(tmp_path: Path) -> None:
    protoc = pytest.importorskip(
        "grpc_tools.protoc", reason="grpcio-tools (the dev-only tool of scripts/gen_proto.sh) is not installed"
    )
    args = ["protoc", f"--proto_path={ROOT}", f"--descriptor_set_out={tmp_path / 'd'}", f"--pyi_out={tmp_path}", PROTO]
    assert protoc.main(args) == 0
    files = descriptor_pb2.FileDescriptorSet.FromString((tmp_path / "d").read_bytes()).file
    assert list(files) == [_stored()], "grpc_service.proto changed: run scripts/gen_proto.sh"
    stubs = [(path / "grpc_service_pb2.pyi").read_text() for path in ((tmp_path / PROTO).parent, SERVER)]
    made, stored = (_stub_names(ast.parse(stub).body) for stub in stubs)
    assert made == stored, "grpc_service.proto changed: run scripts/gen_proto.sh"


def test_the_module_pins_no_protobuf_runtime_and_loads_beside_tritonclient() -> None:
    tree = ast.parse((SERVER / "grpc_service_pb2.py").read_text())
    imports = [(n.level, n.module) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert imports == [(2, "config"), (2, "config._protoclasses")]
    assert pb.DESCRIPTOR.name == PROTO and pb.DESCRIPTOR.package == "libtorchrt.inference"
    assert pb.ModelInferRequest.InferInputTensor.__qualname__ == "ModelInferRequest.InferInputTensor"
    triton = pytest.importorskip("tritonclient.grpc.service_pb2")  # (registers its own grpc_service.proto)
    assert triton.DESCRIPTOR.package == "inference"


# ── Triton's on the wire ───────────────────────────────────────────────────────


def _wire(field: FieldDescriptor) -> tuple[Any, ...]:
    """What decides a field's bytes: its number, type, whether repeated, and what it holds."""
    held = field.message_type.name if field.message_type is not None else None
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        entry = field.message_type.fields_by_name
        held = ("map", _wire(entry["key"]), _wire(entry["value"]))
    repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == FieldDescriptor.LABEL_REPEATED
    oneof = field.containing_oneof.name if field.containing_oneof is not None else None
    return field.number, field.type, repeated, held, oneof


def _fields(message: Descriptor, prefix: str = "") -> dict[str, tuple[Any, ...]]:
    """Every field of ``message`` and its nested messages, by dotted name; a message
    without fields as its name alone (``ServerLiveRequest``)."""
    out: dict[str, tuple[Any, ...]] = {f"{prefix}{message.name}": ()}
    for f in message.fields:
        out[f"{prefix}{message.name}.{f.name}"] = _wire(f)
    for nested in message.nested_types:
        if not nested.GetOptions().map_entry:
            out.update(_fields(nested, f"{prefix}{message.name}."))
    return out


def test_every_message_is_tritons_field_for_field() -> None:
    triton = pytest.importorskip("tritonclient.grpc.service_pb2")
    theirs: dict[str, tuple[Any, ...]] = {}
    ours: dict[str, tuple[Any, ...]] = {}
    for message in triton.DESCRIPTOR.message_types_by_name.values():
        theirs.update(_fields(message))
    for message in pb.DESCRIPTOR.message_types_by_name.values():
        ours.update(_fields(message))
    assert len(theirs) > 180
    assert ours == theirs


def test_the_service_is_tritons() -> None:
    triton = pytest.importorskip("tritonclient.grpc.service_pb2")

    def methods(file: Any) -> dict[str, tuple[str, str, bool, bool]]:
        service = file.services_by_name["GRPCInferenceService"]
        return {m.name: (m.input_type.name, m.output_type.name, m.client_streaming, m.server_streaming)
                for m in service.methods}  # fmt: skip

    assert methods(pb.DESCRIPTOR) == methods(triton.DESCRIPTOR)
    assert triton.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name == "inference.GRPCInferenceService"


def test_the_model_config_is_a_subset_of_tritons() -> None:
    triton = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    theirs: dict[str, tuple[Any, ...]] = {}
    for message in triton.DESCRIPTOR.message_types_by_name.values():
        theirs.update(_fields(message))
    ours: dict[str, tuple[Any, ...]] = {}
    for message in model_config_pb2.DESCRIPTOR.message_types_by_name.values():
        ours.update(_fields(message))
    assert len(ours) > 100
    assert {k: v for k, v in ours.items() if theirs.get(k) != v} == {}


def test_every_rpc_is_served() -> None:
    from libtorchrt.server.grpc_server import _Service

    for method in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
        assert callable(getattr(_Service, method.name, None)), method.name
