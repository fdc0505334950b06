#!/usr/bin/env python3
"""Checks that Cleave's `inference` proto is wire-identical to what tritonclient uses.

Contract
--------
Run in the venv of tests/kserve/requirements.txt (tritonclient[grpc] 2.73.0, grpcio-tools):

    python tests/kserve/compat_check.py [--proto PATH] [--quiet]

--proto  our proto file (default: proto/proto/inference/grpc_service.proto of this
         repository, found relative to this script).
--quiet  print only the verdict line and any mismatches.

What it does:
1. Compiles our proto with grpcio-tools' bundled protoc into a FileDescriptorSet (no system
   protoc needed), and loads the FileDescriptorProto that tritonclient ships
   (`tritonclient.grpc.service_pb2.DESCRIPTOR`).
2. Descriptor comparison: same package and syntax; every message we declare (nested ones
   included) exists in tritonclient's file with every field identical in name, number, type,
   label, type_name, oneof membership and proto3 `optional`; and no field of tritonclient's
   version of that message is missing from ours (a missing field would be silently dropped).
   Map-entry messages must agree. Every enum we declare must match value for value. Our
   service must have tritonclient's service name, and each of our methods must exist there
   with the same input and output types and client/server streaming flags. The six RPCs that
   tritonclient's InferenceServerClient uses for liveness, readiness, metadata and `infer`
   (ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelInfer) must be
   declared.
3. Wire round trip: messages built the way tritonclient builds them (InferInput BYTES and
   FP32 with raw contents, every InferParameter kind, requested output with classification,
   a response with raw FP32 output, metadata responses, a stream response) are serialized
   with tritonclient's classes, parsed with classes generated from our descriptor, and
   back: the parsed message must carry no unknown fields and both sides must agree field by
   field (MessageToDict) and byte for byte (deterministic serialization).

Output: one line per checked item on stdout (unless --quiet), then `OK: ...` and exit status
0, or `FAIL: N mismatch(es)` and exit status 1 (2 if the proto does not compile).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.protobuf import unknown_fields
from grpc_tools import protoc

import tritonclient.grpc as grpcclient
from tritonclient.grpc import _utils as triton_utils
from tritonclient.grpc import service_pb2 as triton_pb2

REPO = Path(__file__).resolve().parents[2]
DEFAULT_PROTO = REPO / "proto" / "proto" / "inference" / "grpc_service.proto"

# The RPCs tritonclient's InferenceServerClient calls for is_server_live, is_server_ready,
# is_model_ready, get_server_metadata, get_model_metadata and infer.
REQUIRED_METHODS = [
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelInfer",
]

FIELD_ATTRS = ["number", "type", "label", "type_name", "proto3_optional"]


class Report:
    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.failures: list[str] = []
        self.matched = 0

    def ok(self, what: str) -> None:
        self.matched += 1
        if not self.quiet:
            print(f"  ok    {what}")

    def fail(self, what: str) -> None:
        self.failures.append(what)
        print(f"  FAIL  {what}")


def compile_ours(proto: Path) -> descriptor_pb2.FileDescriptorProto:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ours.pb")
        include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
        rc = protoc.main(
            [
                "protoc",
                f"-I{proto.parent}",
                f"-I{include}",
                f"--descriptor_set_out={out}",
                str(proto),
            ]
        )
        if rc != 0:
            print(f"FAIL: protoc could not compile {proto} (exit {rc})")
            sys.exit(2)
        fds = descriptor_pb2.FileDescriptorSet()
        with open(out, "rb") as f:
            fds.ParseFromString(f.read())
    if len(fds.file) != 1:
        print(f"FAIL: expected one file in the descriptor set, got {len(fds.file)}")
        sys.exit(2)
    return fds.file[0]


def triton_file() -> descriptor_pb2.FileDescriptorProto:
    fdp = descriptor_pb2.FileDescriptorProto()
    triton_pb2.DESCRIPTOR.CopyToProto(fdp)
    return fdp


def index_messages(fdp: descriptor_pb2.FileDescriptorProto) -> dict[str, descriptor_pb2.DescriptorProto]:
    """Full name (".pkg.Outer.Inner") → message, nested messages included."""
    out: dict[str, descriptor_pb2.DescriptorProto] = {}

    def walk(prefix: str, msgs) -> None:
        for m in msgs:
            full = f"{prefix}.{m.name}"
            out[full] = m
            walk(full, m.nested_type)

    walk(f".{fdp.package}", fdp.message_type)
    return out


def index_enums(fdp: descriptor_pb2.FileDescriptorProto) -> dict[str, descriptor_pb2.EnumDescriptorProto]:
    out: dict[str, descriptor_pb2.EnumDescriptorProto] = {}
    for e in fdp.enum_type:
        out[f".{fdp.package}.{e.name}"] = e

    def walk(prefix: str, msgs) -> None:
        for m in msgs:
            full = f"{prefix}.{m.name}"
            for e in m.enum_type:
                out[f"{full}.{e.name}"] = e
            walk(full, m.nested_type)

    walk(f".{fdp.package}", fdp.message_type)
    return out


def field_attr(field: descriptor_pb2.FieldDescriptorProto, attr: str) -> str:
    value = getattr(field, attr)
    if attr == "type":
        return descriptor_pb2.FieldDescriptorProto.Type.Name(value)
    if attr == "label":
        return descriptor_pb2.FieldDescriptorProto.Label.Name(value)
    return repr(value)


def oneof_name(msg: descriptor_pb2.DescriptorProto, field: descriptor_pb2.FieldDescriptorProto) -> str | None:
    if not field.HasField("oneof_index"):
        return None
    return msg.oneof_decl[field.oneof_index].name


def compare_descriptors(ours, theirs, r: Report) -> None:
    print(f"descriptors: ours {ours.name} vs tritonclient {theirs.name}")
    for attr in ["package", "syntax"]:
        a, b = getattr(ours, attr), getattr(theirs, attr)
        (r.ok if a == b else r.fail)(f"file {attr}: ours {a!r}, tritonclient {b!r}")

    our_msgs, their_msgs = index_messages(ours), index_messages(theirs)
    for full, m in our_msgs.items():
        t = their_msgs.get(full)
        if t is None:
            r.fail(f"message {full}: not in tritonclient's descriptor")
            continue
        if m.options.map_entry != t.options.map_entry:
            r.fail(
                f"message {full}: map_entry ours {m.options.map_entry}, "
                f"tritonclient {t.options.map_entry}"
            )
        their_fields = {f.name: f for f in t.field}
        bad = 0
        for f in m.field:
            tf = their_fields.get(f.name)
            if tf is None:
                r.fail(f"field {full}.{f.name} = {f.number}: not in tritonclient's message")
                bad += 1
                continue
            diffs = [
                f"{a} ours {field_attr(f, a)} tritonclient {field_attr(tf, a)}"
                for a in FIELD_ATTRS
                if getattr(f, a) != getattr(tf, a)
            ]
            if oneof_name(m, f) != oneof_name(t, tf):
                diffs.append(f"oneof ours {oneof_name(m, f)!r} tritonclient {oneof_name(t, tf)!r}")
            if diffs:
                r.fail(f"field {full}.{f.name}: " + "; ".join(diffs))
                bad += 1
        ours_names = {f.name for f in m.field}
        for tf in t.field:
            if tf.name not in ours_names:
                r.fail(f"field {full}.{tf.name} = {tf.number}: in tritonclient's message, missing from ours")
                bad += 1
        if not bad:
            r.ok(f"message {full}: {len(m.field)} field(s) identical")

    our_enums, their_enums = index_enums(ours), index_enums(theirs)
    for full, e in our_enums.items():
        t = their_enums.get(full)
        if t is None:
            r.fail(f"enum {full}: not in tritonclient's descriptor")
            continue
        a = [(v.name, v.number) for v in e.value]
        b = [(v.name, v.number) for v in t.value]
        (r.ok if a == b else r.fail)(f"enum {full}: ours {a}, tritonclient {b}")

    if len(ours.service) != 1:
        r.fail(f"expected exactly one service in our file, found {len(ours.service)}")
        return
    svc = ours.service[0]
    theirs_svc = {s.name: s for s in theirs.service}
    tsvc = theirs_svc.get(svc.name)
    if tsvc is None:
        r.fail(f"service {ours.package}.{svc.name}: tritonclient has {sorted(theirs_svc)}")
        return
    r.ok(f"service {ours.package}.{svc.name}")
    their_methods = {m.name: m for m in tsvc.method}
    for m in svc.method:
        t = their_methods.get(m.name)
        if t is None:
            r.fail(f"rpc {svc.name}.{m.name}: not in tritonclient's service")
            continue
        ours_sig = (m.input_type, m.output_type, m.client_streaming, m.server_streaming)
        their_sig = (t.input_type, t.output_type, t.client_streaming, t.server_streaming)
        what = (
            f"rpc {m.name}({'stream ' if m.client_streaming else ''}{m.input_type}) returns "
            f"({'stream ' if m.server_streaming else ''}{m.output_type})"
        )
        (r.ok if ours_sig == their_sig else r.fail)(
            what if ours_sig == their_sig else f"{what}: tritonclient has {their_sig}"
        )
    declared = {m.name for m in svc.method}
    for name in REQUIRED_METHODS:
        if name not in declared:
            r.fail(f"rpc {name}: tritonclient calls it, we do not declare it")
    skipped = sorted(set(their_methods) - declared)
    print(f"  (tritonclient RPCs not declared by us, answered UNIMPLEMENTED: {', '.join(skipped)})")


def sample_messages():
    """Messages built with tritonclient's own classes and helpers, as its client sends them."""
    frame = grpcclient.InferInput("frame", [2], "BYTES")
    frame.set_data_from_numpy(np.array([b"\x00CLV\x01frame", b""], dtype=np.object_))
    bottleneck = grpcclient.InferInput("bottleneck", [1, 12, 28, 28], "FP32")
    bottleneck.set_data_from_numpy(np.linspace(-1, 1, 12 * 28 * 28, dtype=np.float32).reshape(1, 12, 28, 28))
    shm = grpcclient.InferInput("shm", [4], "INT64")
    shm.set_shared_memory("region", 32, offset=8)
    out = grpcclient.InferRequestedOutput("logits", class_count=5)
    request = triton_utils._get_inference_request(
        model_name="efficientnet-lite0-split",
        inputs=[frame, bottleneck, shm],
        model_version="1",
        request_id="req-7",
        outputs=[out, grpcclient.InferRequestedOutput("other")],
        sequence_id=42,
        sequence_start=True,
        sequence_end=False,
        priority=3,
        timeout=1000,
        parameters={"s": "x", "b": True, "i": -5, "d": 0.25},
    )
    typed = triton_pb2.ModelInferRequest(model_name="m")
    t = typed.inputs.add(name="x", datatype="FP32", shape=[2])
    t.contents.fp32_contents.extend([1.5, -2.0])
    for field, values in [
        ("bool_contents", [True, False]),
        ("int_contents", [-1, 2]),
        ("int64_contents", [-(2**40)]),
        ("uint_contents", [2**31]),
        ("uint64_contents", [2**63]),
        ("fp64_contents", [0.125]),
        ("bytes_contents", [b"a", b""]),
    ]:
        getattr(typed.inputs.add(name=field).contents, field).extend(values)

    logits = np.arange(2 * 1000, dtype=np.float32).reshape(2, 1000)
    response = triton_pb2.ModelInferResponse(
        model_name="efficientnet-lite0-split", model_version="1", id="req-7"
    )
    o = response.outputs.add(name="logits", datatype="FP32", shape=[2, 1000])
    o.parameters["binary_data_size"].int64_param = logits.nbytes
    response.raw_output_contents.append(logits.tobytes())
    response.parameters["triton_final_response"].bool_param = True
    o2 = response.outputs.add(name="labels", datatype="BYTES", shape=[1])
    o2.contents.bytes_contents.append(b"espresso")

    metadata = triton_pb2.ModelMetadataResponse(
        name="efficientnet-lite0-split", versions=["1"], platform="cleave_split"
    )
    metadata.inputs.add(name="frame", datatype="BYTES", shape=[1])
    metadata.inputs.add(name="bottleneck", datatype="FP32", shape=[-1, 12, 28, 28])
    metadata.outputs.add(name="logits", datatype="FP32", shape=[-1, 1000])

    return [
        request,
        typed,
        response,
        metadata,
        triton_pb2.ServerMetadataResponse(name="cleave-tail", version="0.1.0", extensions=["a", "b"]),
        triton_pb2.ModelReadyRequest(name="m", version="1"),
        triton_pb2.ModelMetadataRequest(name="m", version=""),
        triton_pb2.ServerLiveResponse(live=True),
        triton_pb2.ServerReadyResponse(ready=True),
        triton_pb2.ModelReadyResponse(ready=True),
        triton_pb2.ModelStreamInferResponse(error_message="", infer_response=response),
        triton_pb2.ModelStreamInferResponse(error_message="boom"),
    ]


def has_unknown_fields(msg) -> list[str]:
    """Paths of (sub)messages that carry fields our descriptor does not know."""
    found = []
    if len(unknown_fields.UnknownFieldSet(msg)):
        found.append(msg.DESCRIPTOR.full_name)
    for fd, value in msg.ListFields():
        if fd.message_type is None:
            continue
        if fd.message_type.GetOptions().map_entry:
            value_fd = fd.message_type.fields_by_name["value"]
            items = value.values() if value_fd.message_type is not None else []
        elif fd.is_repeated:
            items = value
        else:
            items = [value]
        for item in items:
            found.extend(has_unknown_fields(item))
    return found


def short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def dict_diffs(ours, theirs, path: str = "") -> list[str]:
    """Where two MessageToDict results differ, as short `path: ours X, tritonclient Y` lines."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        out = []
        for key in sorted(set(ours) | set(theirs)):
            sub = f"{path}.{key}" if path else key
            if key not in ours:
                out.append(f"{sub}: missing from ours (tritonclient {short(theirs[key])})")
            elif key not in theirs:
                out.append(f"{sub}: only in ours ({short(ours[key])})")
            else:
                out.extend(dict_diffs(ours[key], theirs[key], sub))
        return out
    if isinstance(ours, list) and isinstance(theirs, list) and len(ours) == len(theirs):
        out = []
        for i, (a, b) in enumerate(zip(ours, theirs)):
            out.extend(dict_diffs(a, b, f"{path}[{i}]"))
        return out
    return [] if ours == theirs else [f"{path}: ours {short(ours)}, tritonclient {short(theirs)}"]


def round_trip(ours_fdp, r: Report) -> None:
    print("wire round trip: tritonclient's messages → our classes → back")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(ours_fdp)
    for theirs in sample_messages():
        name = theirs.DESCRIPTOR.full_name
        try:
            cls = message_factory.GetMessageClass(pool.FindMessageTypeByName(name))
        except KeyError:
            r.fail(f"round trip {name}: not declared by us")
            continue
        wire = theirs.SerializeToString(deterministic=True)
        ours = cls.FromString(wire)
        unknown = has_unknown_fields(ours)
        if unknown:
            r.fail(f"round trip {name}: our parse left unknown fields in {sorted(set(unknown))}")
            continue
        d_ours = json_format.MessageToDict(ours, preserving_proto_field_name=True)
        d_theirs = json_format.MessageToDict(theirs, preserving_proto_field_name=True)
        if d_ours != d_theirs:
            r.fail(f"round trip {name}: fields differ: " + "; ".join(dict_diffs(d_ours, d_theirs)[:5]))
            continue
        back = type(theirs).FromString(ours.SerializeToString(deterministic=True))
        if back.SerializeToString(deterministic=True) != wire:
            r.fail(f"round trip {name}: bytes differ after re-serializing with our classes")
            continue
        r.ok(f"round trip {name}: {len(wire)} bytes, {len(d_ours)} top-level field(s)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--proto", type=Path, default=DEFAULT_PROTO, help="our grpc_service.proto")
    ap.add_argument("--quiet", action="store_true", help="print only mismatches and the verdict")
    args = ap.parse_args()

    ours = compile_ours(args.proto.resolve())
    theirs = triton_file()
    r = Report(args.quiet)
    compare_descriptors(ours, theirs, r)
    round_trip(ours, r)
    if r.failures:
        print(f"FAIL: {len(r.failures)} mismatch(es), {r.matched} check(s) passed")
        return 1
    print(
        f"OK: {r.matched} check(s) passed; {args.proto.name} is wire-identical to "
        f"tritonclient {triton_version()} for everything it declares"
    )
    return 0


def triton_version() -> str:
    try:
        from importlib.metadata import version

        return version("tritonclient")
    except Exception:  # noqa: BLE001 - only for the message
        return "(unknown version)"


if __name__ == "__main__":
    sys.exit(main())
