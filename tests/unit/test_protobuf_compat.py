"""``model_config_pb2`` runs on any protobuf runtime: it is not protoc's version-pinned
Python output, it defines the names that output would (those of its ``.pyi``), and its
serialized descriptor is ``model_config.proto``'s."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor

from libtorchrt.config import model_config_pb2 as pb

CONFIG = Path(pb.__file__).parent
ROOT = CONFIG.parent.parent
PROTO = "libtorchrt/config/model_config.proto"


def _names(module: str) -> set[str]:
    """Every name the module's code uses or imports (not its docstrings)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse((CONFIG / module).read_text())):
        if isinstance(node, ast.Name):
            out.add(node.id)
        elif isinstance(node, ast.Attribute):
            out.add(node.attr)
        elif isinstance(node, ast.ImportFrom):
            out |= {f"{node.module}", *(alias.name for alias in node.names)}
        elif isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
    return out


def test_the_module_does_not_pin_a_protobuf_runtime() -> None:
    # protoc's gencode calls runtime_version.ValidateProtobufRuntimeVersion, which refuses
    # runtimes older than the protoc that made it (tritonclient[grpc] needs protobuf<7).
    for module in ("model_config_pb2.py", "_protoclasses.py"):
        names = _names(module)
        assert not {n for n in names if "runtime_version" in n or "builder" in n}, module
        assert "ValidateProtobufRuntimeVersion" not in names, module
    tree = ast.parse((CONFIG / "model_config_pb2.py").read_text())
    imports = [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]
    assert [(n.level, n.module) for n in imports if isinstance(n, ast.ImportFrom)] == [(1, "_protoclasses")]
    assert len(imports) == 1


def _stub_names(body: list[ast.stmt], owner: str = "") -> list[tuple[str, str, str]]:
    """(owner, name, annotation) of every class and annotated name the .pyi declares."""
    out: list[tuple[str, str, str]] = []
    for node in body:
        if isinstance(node, ast.ClassDef):
            out.append((owner, node.name, "class"))
            out += _stub_names(node.body, f"{owner}.{node.name}".lstrip("."))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out.append((owner, node.target.id, ast.unparse(node.annotation)))
    return out


def test_the_module_defines_every_name_of_its_stub() -> None:
    names = _stub_names(ast.parse((CONFIG / "model_config_pb2.pyi").read_text()).body)
    assert len(names) > 300
    for owner, name, annotation in names:
        scope: Any = pb
        for part in filter(None, owner.split(".")):
            scope = getattr(scope, part)
        where = f"{owner}.{name}"
        if annotation == "class":
            value = getattr(scope, name)
            assert isinstance(value, type) or hasattr(value, "Name"), where  # a message class or an enum
        elif name == "DESCRIPTOR":
            assert pb.DESCRIPTOR.name == PROTO
        elif isinstance(scope.DESCRIPTOR, Descriptor) and name in scope.DESCRIPTOR.fields_by_name:
            pass  # a field
        else:
            assert isinstance(getattr(scope, name), int), where  # enum values, FIELD_NUMBER constants


def test_the_classes_are_named_and_nested_as_gencode_makes_them() -> None:
    assert pb.ModelConfig.__module__ == "libtorchrt.config.model_config_pb2"
    assert pb.ModelWarmup.Input.__qualname__ == "ModelWarmup.Input"
    assert pb.ModelWarmup(inputs={"x": pb.ModelWarmup.Input(dims=[1])}).inputs["x"].dims == [1]
    assert pb.DataType.Name(pb.TYPE_FP32) == "TYPE_FP32" and pb.DataType.Value("TYPE_BF16") == pb.TYPE_BF16
    assert pb.ModelInstanceGroup.Kind.Value("KIND_MODEL") == pb.ModelInstanceGroup.KIND_MODEL
    assert pb.DESCRIPTOR.name == PROTO and pb.DESCRIPTOR.package == "libtorchrt.inference"


# ── the descriptor is model_config.proto's ─────────────────────────────────────


def _stored() -> descriptor_pb2.FileDescriptorProto:
    """The descriptor as model_config_pb2.py stores it (the runtime may serialize it anew)."""
    tree = ast.parse((CONFIG / "model_config_pb2.py").read_text())
    (data,) = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, bytes)]
    return descriptor_pb2.FileDescriptorProto.FromString(data)


def test_the_descriptor_is_what_protoc_makes_of_the_proto(tmp_path: Path) -> None:
    protoc = pytest.importorskip(
        "grpc_tools.protoc", reason="grpcio-tools (the dev-only tool of scripts/gen_proto.sh) is not installed"
    )
    args = ["protoc", f"--proto_path={ROOT}", f"--descriptor_set_out={tmp_path / 'd'}", f"--pyi_out={tmp_path}", PROTO]
    assert protoc.main(args) == 0
    files = descriptor_pb2.FileDescriptorSet.FromString((tmp_path / "d").read_bytes()).file
    assert list(files) == [_stored()], "model_config.proto changed: run scripts/gen_proto.sh"
    # The names, not the text: protoc versions lay the .pyi out differently.
    stubs = [(path / "model_config_pb2.pyi").read_text() for path in ((tmp_path / PROTO).parent, CONFIG)]
    made, stored = (_stub_names(ast.parse(stub).body) for stub in stubs)
    assert made == stored, "model_config.proto changed: run scripts/gen_proto.sh"


# Without grpcio-tools: every message, field (name, number, type, repeated) and enum value
# the .proto declares, read with a tokenizer that knows just what the file uses.
_SCALARS = {
    getattr(FieldDescriptor, name): name[5:].lower()
    for name in dir(FieldDescriptor)
    if name.startswith("TYPE_") and name not in ("TYPE_MESSAGE", "TYPE_ENUM", "TYPE_GROUP")
}


def _declared(text: str) -> dict[str, dict[str, tuple[Any, ...]]]:
    text = re.sub(r"//[^\n]*", "", text)
    tokens = re.findall(r"map\s*<[^>]*>|[A-Za-z_][\w.]*|\d+|\"[^\"]*\"|[{};=\[]", text)
    assert "[" not in tokens, "field options: teach _declared to read them"
    scopes: list[tuple[str, str]] = []  # (kind, dotted name)
    out: dict[str, dict[str, tuple[Any, ...]]] = {}
    statement: list[str] = []
    for tok in tokens:
        if tok == "{":
            kind, name = statement[0], statement[1]
            parent = next((n for k, n in reversed(scopes) if k != "oneof"), "")
            dotted = name if kind == "oneof" else f"{parent}.{name}".lstrip(".")
            scopes.append((kind, parent if kind == "oneof" else dotted))
            if kind != "oneof":
                out[dotted] = {}
            statement = []
        elif tok == "}":
            scopes.pop()
        elif tok == ";":
            if scopes and "=" in statement and statement[0] not in ("option", "reserved"):
                kind, owner = scopes[-1]
                i = statement.index("=")
                if kind == "enum":
                    out[owner][statement[0]] = (int(statement[i + 1]),)
                else:
                    typ = re.sub(r"\s", "", statement[i - 2])
                    repeated = statement[0] == "repeated" or typ.startswith("map<")
                    out[owner][statement[i - 1]] = (int(statement[i + 1]), _short(typ), repeated)
            statement = []
        else:
            statement.append(tok)
    return out


def _short(typ: str) -> str:
    """A type as written, its message or enum name without the scope (``map<string,Shape>``)."""
    if typ.startswith("map<"):
        key, value = typ[4:-1].split(",")
        return f"map<{_short(key)},{_short(value)}>"
    return typ.rsplit(".", 1)[-1]


def _field_type(field: FieldDescriptor) -> str:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
        return f"map<{_field_type(key)},{_field_type(value)}>"
    if field.message_type is not None:
        return str(field.message_type.name)
    if field.enum_type is not None:
        return str(field.enum_type.name)
    return _SCALARS[field.type]


def _is_repeated(field: FieldDescriptor) -> bool:
    if hasattr(field, "is_repeated"):  # protobuf >= 5.x (7.x drops label)
        return bool(field.is_repeated)
    return bool(field.label == FieldDescriptor.LABEL_REPEATED)


def _described(
    types: list[Descriptor | EnumDescriptor], prefix: str = "", out: dict[str, dict[str, tuple[Any, ...]]] | None = None
) -> dict[str, dict[str, tuple[Any, ...]]]:
    out = {} if out is None else out
    for t in types:
        dotted = prefix + t.name
        if isinstance(t, EnumDescriptor):
            out[dotted] = {v.name: (v.number,) for v in t.values}
            continue
        if t.GetOptions().map_entry:
            continue
        out[dotted] = {f.name: (f.number, _field_type(f), _is_repeated(f)) for f in t.fields}
        _described([*t.nested_types, *t.enum_types], f"{dotted}.", out)
    return out


def test_the_descriptor_declares_what_the_proto_declares() -> None:
    declared = _declared((ROOT / PROTO).read_text())
    described = _described([*pb.DESCRIPTOR.message_types_by_name.values(), *pb.DESCRIPTOR.enum_types_by_name.values()])
    assert len(declared) > 40 and sum(map(len, declared.values())) > 150
    assert described == declared, "model_config.proto changed: run scripts/gen_proto.sh"
