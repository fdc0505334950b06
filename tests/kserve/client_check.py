#!/usr/bin/env python3
"""Drives a KServe v2 / Open Inference Protocol gRPC server with NVIDIA's tritonclient, unchanged.

Proves that a stock `tritonclient[grpc]` (2.73.0, tests/kserve/requirements.txt) can use the
server: liveness, readiness, metadata, inference with BYTES and FP32 inputs, and the error
statuses a client relies on. Only `tritonclient.grpc.InferenceServerClient` talks to the
server; nothing here knows Cleave's own protocol.

Usage
-----
    python tests/kserve/client_check.py --url HOST:PORT --model NAME
        [--model-version V] [--frame FILE]... [--bottleneck FILE]...
        [--frame-input NAME] [--bottleneck-input NAME] [--bottleneck-shape N,C,H,W]
        [--output NAME] [--output-datatype FP32]
        [--unknown-model NAME | --skip-unknown-model]
        [--bad-shape-input NAME] [--bad-shape D,D,...] [--skip-bad-shape]
        [--save-outputs DIR] [--timeout S] [--wait S]

--url HOST:PORT          gRPC address of the server (no scheme).
--model NAME             model to check (a Cleave bundle: its bundle name).
--model-version V        version to ask for; default "" lets the server choose.
--frame FILE             one coded feature frame (bytes, sent as is). Each file is one
                         ModelInfer: input `--frame-input` (default: the model's BYTES input
                         from get_model_metadata, else "frame"), datatype BYTES, shape [1],
                         data np.array([file bytes], dtype=object) — tritonclient sends it in
                         raw_input_contents as a 4-byte little-endian length + the bytes.
--bottleneck FILE        an FP32 tensor, `.npy` (its own shape; cast to float32) or raw
                         little-endian float32 (shape from --bottleneck-shape, else from the
                         metadata shape with the leading -1 solved from the file size). Each
                         file is one ModelInfer on input `--bottleneck-input` (default: the
                         model's FP32 input from metadata, else "bottleneck").
--output NAME            output to request (default: the model's first output in metadata,
                         else "logits"); it must come back with --output-datatype (FP32).
--unknown-model NAME     model name for the NOT_FOUND checks (default "cleave-no-such-model").
--bad-shape-input NAME / --bad-shape D,...
                         the INVALID_ARGUMENT check: an input of a wrong shape, zero-filled.
                         Default: the first bottleneck (or FP32 input in metadata) with its
                         last dimension one larger; else the frame input with shape [1, 1].
--save-outputs DIR       write every returned output as DIR/<n>-<kind>.npy (n from 0).
--timeout S              per-call client timeout, seconds (default 60).
--wait S                 poll is_server_live up to S seconds before the checks (default 0).

Checks (each failed one is listed in "failures"):
  is_server_live() and is_server_ready() are True; get_server_metadata() answers;
  is_model_ready(model, version) is True; get_model_metadata(model, version) names the model
  and lists the inputs used and the requested output; every infer answers with the model's
  name, the request id echoed, a non-empty model_version (equal to --model-version when given,
  else one of the metadata's versions when it lists any), the requested output with the
  expected datatype, a shape whose first dimension is the input's batch (1 for a frame; N for
  a bottleneck [N, ...]), whose last dimension matches the metadata's when fixed, and finite
  values; the unknown model gets StatusCode.NOT_FOUND from infer() and get_model_metadata(),
  with a message naming the served model (`--model`), and is_model_ready() False (Triton's
  behaviour: no error); the wrong shape gets StatusCode.INVALID_ARGUMENT from infer().

Output
------
stdout: one JSON object (stderr carries progress lines):
  {"ok": bool, "url": str, "model": str,
   "server_live": bool, "server_ready": bool,
   "server_metadata": {"name", "version", "extensions": [str]},
   "model_ready": bool,
   "model_metadata": {"name", "versions": [str], "platform",
                      "inputs": [{"name", "datatype", "shape": [int]}], "outputs": [...]},
   "infers": [{"kind": "frame"|"bottleneck", "file", "input", "input_shape": [int],
               "request_id", "model_name", "model_version", "output", "datatype",
               "shape": [int], "top1": [int per row], "top1_value": [float per row],
               "saved": path|null}],
   "errors": [{"check": "unknown_model_infer"|"unknown_model_metadata"|"bad_shape",
               "status": "StatusCode.X"|null, "message": str|null, "expected": "StatusCode.Y"}],
   "unknown_model_ready": bool|null,
   "failures": [str]}
"top1" is the argmax over the last axis of each row of the output (leading axes flattened),
so a Rust test can compare it with its own logits' argmax.

Exit status: 0 all checks passed; 1 a check failed; 2 bad arguments or unreadable input file;
3 the server could not be reached (JSON still printed, with "unreachable": true).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

NOT_FOUND = "StatusCode.NOT_FOUND"
INVALID_ARGUMENT = "StatusCode.INVALID_ARGUMENT"
UNAVAILABLE = "StatusCode.UNAVAILABLE"


def log(msg: str) -> None:
    print(f"client_check: {msg}", file=sys.stderr, flush=True)


def parse_shape(text: str) -> list[int]:
    try:
        shape = [int(d) for d in text.replace(" ", "").strip("[]").split(",") if d != ""]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not a shape: {text!r}") from e
    if not shape:
        raise argparse.ArgumentTypeError(f"empty shape: {text!r}")
    return shape


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Drive a KServe v2 gRPC server with tritonclient; print a JSON summary.",
        epilog="See the module docstring for the full contract.",
    )
    ap.add_argument("--url", required=True, help="HOST:PORT of the gRPC server")
    ap.add_argument("--model", required=True, help="model name to check")
    ap.add_argument("--model-version", default="", help='version to ask for (default "")')
    ap.add_argument("--frame", action="append", default=[], type=Path, help="coded frame file")
    ap.add_argument("--bottleneck", action="append", default=[], type=Path, help=".npy or raw f32")
    ap.add_argument("--frame-input", help="BYTES input name (default from metadata, else frame)")
    ap.add_argument("--bottleneck-input", help="FP32 input name (default from metadata)")
    ap.add_argument("--bottleneck-shape", type=parse_shape, help="shape of raw bottleneck files")
    ap.add_argument("--output", help="output to request (default from metadata, else logits)")
    ap.add_argument("--output-datatype", default="FP32", help="expected output datatype")
    ap.add_argument("--unknown-model", default="cleave-no-such-model")
    ap.add_argument("--skip-unknown-model", action="store_true")
    ap.add_argument("--bad-shape-input", help="input for the INVALID_ARGUMENT check")
    ap.add_argument("--bad-shape", type=parse_shape, help="shape for the INVALID_ARGUMENT check")
    ap.add_argument("--skip-bad-shape", action="store_true")
    ap.add_argument("--save-outputs", type=Path, help="write returned outputs as .npy here")
    ap.add_argument("--timeout", type=float, default=60.0, help="per-call timeout, seconds")
    ap.add_argument("--wait", type=float, default=0.0, help="wait for liveness up to S seconds")
    return ap.parse_args(argv)


def tensor_meta(t) -> dict:
    return {"name": t.name, "datatype": t.datatype, "shape": [int(d) for d in t.shape]}


def model_metadata_dict(md) -> dict:
    return {
        "name": md.name,
        "versions": list(md.versions),
        "platform": md.platform,
        "inputs": [tensor_meta(t) for t in md.inputs],
        "outputs": [tensor_meta(t) for t in md.outputs],
    }


class Checker:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.failures: list[str] = []
        self.summary: dict = {
            "ok": False,
            "url": args.url,
            "model": args.model,
            "server_live": None,
            "server_ready": None,
            "server_metadata": None,
            "model_ready": None,
            "model_metadata": None,
            "infers": [],
            "errors": [],
            "unknown_model_ready": None,
            "failures": self.failures,
        }
        self.client = grpcclient.InferenceServerClient(url=args.url)
        self.metadata: dict | None = None
        self.infer_count = 0

    def expect(self, cond: bool, what: str) -> bool:
        if not cond:
            self.failures.append(what)
            log(f"FAILED: {what}")
        return cond

    # -- metadata-derived defaults ------------------------------------------------------

    def meta_input(self, name: str | None, datatype: str, fallback: str) -> tuple[str, list[int] | None]:
        inputs = (self.metadata or {}).get("inputs", [])
        if name is None:
            found = next((t for t in inputs if t["datatype"] == datatype), None)
            name = found["name"] if found else fallback
        meta = next((t for t in inputs if t["name"] == name), None)
        return name, (meta["shape"] if meta else None)

    def meta_output(self) -> tuple[str, list[int] | None]:
        outputs = (self.metadata or {}).get("outputs", [])
        name = self.args.output or (outputs[0]["name"] if outputs else "logits")
        meta = next((t for t in outputs if t["name"] == name), None)
        return name, (meta["shape"] if meta else None)

    # -- the checks ---------------------------------------------------------------------

    def server(self) -> None:
        t = self.args.timeout
        self.summary["server_live"] = self.client.is_server_live(client_timeout=t)
        self.expect(self.summary["server_live"] is True, "is_server_live() is not True")
        self.summary["server_ready"] = self.client.is_server_ready(client_timeout=t)
        self.expect(self.summary["server_ready"] is True, "is_server_ready() is not True")
        sm = self.client.get_server_metadata(client_timeout=t)
        self.summary["server_metadata"] = {
            "name": sm.name,
            "version": sm.version,
            "extensions": list(sm.extensions),
        }
        self.expect(sm.name != "", "server metadata has an empty name")
        log(f"server {sm.name} {sm.version}, extensions {list(sm.extensions)}")

    def model(self) -> None:
        a = self.args
        ready = self.client.is_model_ready(a.model, a.model_version, client_timeout=a.timeout)
        self.summary["model_ready"] = ready
        self.expect(ready is True, f"is_model_ready({a.model!r}, {a.model_version!r}) is not True")
        try:
            md = self.client.get_model_metadata(a.model, a.model_version, client_timeout=a.timeout)
        except InferenceServerException as e:
            self.expect(False, f"get_model_metadata({a.model!r}) failed: {e}")
            return
        self.metadata = model_metadata_dict(md)
        self.summary["model_metadata"] = self.metadata
        log(f"model metadata {json.dumps(self.metadata)}")
        self.expect(md.name == a.model, f"model metadata name {md.name!r} != {a.model!r}")
        names = {t["name"]: t for t in self.metadata["inputs"]}
        if a.frame:
            name, _ = self.meta_input(a.frame_input, "BYTES", "frame")
            t = names.get(name)
            self.expect(t is not None, f"model metadata lists no input {name!r}")
            if t:
                self.expect(t["datatype"] == "BYTES", f"input {name!r} is {t['datatype']}, not BYTES")
        if a.bottleneck:
            name, _ = self.meta_input(a.bottleneck_input, "FP32", "bottleneck")
            t = names.get(name)
            self.expect(t is not None, f"model metadata lists no input {name!r}")
            if t:
                self.expect(t["datatype"] == "FP32", f"input {name!r} is {t['datatype']}, not FP32")
        out, _ = self.meta_output()
        o = next((t for t in self.metadata["outputs"] if t["name"] == out), None)
        if self.expect(o is not None, f"model metadata lists no output {out!r}"):
            self.expect(
                o["datatype"] == a.output_datatype,
                f"output {out!r} is {o['datatype']} in metadata, not {a.output_datatype}",
            )

    def load_bottleneck(self, path: Path) -> np.ndarray:
        _, meta_shape = self.meta_input(self.args.bottleneck_input, "FP32", "bottleneck")
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False).astype(np.float32, copy=False)
        flat = np.fromfile(path, dtype="<f4")
        shape = self.args.bottleneck_shape
        if shape is None:
            if not meta_shape:
                raise ValueError(f"{path}: raw file needs --bottleneck-shape (no metadata shape)")
            shape = list(meta_shape)
            known = math.prod(d for d in shape if d >= 0)
            unknown = [i for i, d in enumerate(shape) if d < 0]
            if len(unknown) > 1 or known == 0:
                raise ValueError(f"{path}: cannot solve shape {meta_shape}; give --bottleneck-shape")
            if unknown:
                shape[unknown[0]] = flat.size // known
        if math.prod(shape) != flat.size:
            raise ValueError(f"{path}: {flat.size} floats do not fill shape {shape}")
        return flat.reshape(shape).astype(np.float32)

    def infer(self, kind: str, path: Path, tensor: grpcclient.InferInput, batch: int) -> None:
        a = self.args
        out_name, out_meta_shape = self.meta_output()
        request_id = f"client-check-{self.infer_count}"
        record = {
            "kind": kind,
            "file": str(path),
            "input": tensor.name(),
            "input_shape": [int(d) for d in tensor.shape()],
            "request_id": request_id,
        }
        self.summary["infers"].append(record)
        n = self.infer_count
        self.infer_count += 1
        what = f"infer #{n} ({kind} {path.name})"
        try:
            result = self.client.infer(
                a.model,
                [tensor],
                model_version=a.model_version,
                outputs=[grpcclient.InferRequestedOutput(out_name)],
                request_id=request_id,
                client_timeout=a.timeout,
            )
        except InferenceServerException as e:
            record["error"] = {"status": e.status(), "message": e.message()}
            self.expect(False, f"{what} failed: {e}")
            return
        resp = result.get_response()
        record["model_name"] = resp.model_name
        record["model_version"] = resp.model_version
        self.expect(resp.model_name == a.model, f"{what}: model_name {resp.model_name!r} != {a.model!r}")
        self.expect(resp.id == request_id, f"{what}: id {resp.id!r} does not echo {request_id!r}")
        self.expect(resp.model_version != "", f"{what}: empty model_version")
        if a.model_version:
            self.expect(
                resp.model_version == a.model_version,
                f"{what}: model_version {resp.model_version!r} != {a.model_version!r}",
            )
        elif self.metadata and self.metadata["versions"]:
            self.expect(
                resp.model_version in self.metadata["versions"],
                f"{what}: model_version {resp.model_version!r} not in {self.metadata['versions']}",
            )
        out = result.get_output(out_name)
        if not self.expect(out is not None, f"{what}: no output {out_name!r} in the response"):
            return
        record["output"] = out_name
        record["datatype"] = out.datatype
        record["shape"] = [int(d) for d in out.shape]
        if not self.expect(
            out.datatype == a.output_datatype,
            f"{what}: output datatype {out.datatype} != {a.output_datatype}",
        ):
            return
        try:
            array = result.as_numpy(out_name)
        except Exception as e:  # noqa: BLE001 - a malformed payload is a finding, not a crash
            self.expect(False, f"{what}: as_numpy({out_name!r}) failed: {e}")
            return
        if not self.expect(array is not None and array.ndim >= 1, f"{what}: output has no data"):
            return
        self.expect(
            array.shape[0] == batch,
            f"{what}: output batch {array.shape[0]} != input batch {batch} (shape {list(array.shape)})",
        )
        if out_meta_shape and out_meta_shape[-1] > 0:
            self.expect(
                array.shape[-1] == out_meta_shape[-1],
                f"{what}: output last dim {array.shape[-1]} != metadata {out_meta_shape}",
            )
        self.expect(bool(np.all(np.isfinite(array))), f"{what}: output has non-finite values")
        rows = array.reshape(-1, array.shape[-1]) if array.ndim > 1 else array.reshape(1, -1)
        record["top1"] = [int(i) for i in rows.argmax(axis=1)]
        record["top1_value"] = [float(v) for v in rows.max(axis=1)]
        record["saved"] = None
        if a.save_outputs:
            a.save_outputs.mkdir(parents=True, exist_ok=True)
            dest = a.save_outputs / f"{n}-{kind}.npy"
            np.save(dest, array)
            record["saved"] = str(dest)
        log(f"{what}: {out_name} {out.datatype} {record['shape']} top1 {record['top1']}")

    def frames(self) -> None:
        name, _ = self.meta_input(self.args.frame_input, "BYTES", "frame")
        for path in self.args.frame:
            data = path.read_bytes()
            t = grpcclient.InferInput(name, [1], "BYTES")
            t.set_data_from_numpy(np.array([data], dtype=np.object_))
            self.infer("frame", path, t, batch=1)

    def bottlenecks(self) -> None:
        name, _ = self.meta_input(self.args.bottleneck_input, "FP32", "bottleneck")
        for path in self.args.bottleneck:
            array = self.load_bottleneck(path)
            t = grpcclient.InferInput(name, list(array.shape), "FP32")
            t.set_data_from_numpy(np.ascontiguousarray(array))
            self.infer("bottleneck", path, t, batch=int(array.shape[0]) if array.ndim else 1)

    def any_input(self) -> grpcclient.InferInput:
        """A well-formed input for the model, for requests that must fail for another reason."""
        a = self.args
        if a.frame:
            name, _ = self.meta_input(a.frame_input, "BYTES", "frame")
            t = grpcclient.InferInput(name, [1], "BYTES")
            return t.set_data_from_numpy(np.array([a.frame[0].read_bytes()], dtype=np.object_))
        if a.bottleneck:
            name, _ = self.meta_input(a.bottleneck_input, "FP32", "bottleneck")
            array = np.ascontiguousarray(self.load_bottleneck(a.bottleneck[0]))
            return grpcclient.InferInput(name, list(array.shape), "FP32").set_data_from_numpy(array)
        return grpcclient.InferInput("x", [1], "FP32").set_data_from_numpy(np.zeros([1], np.float32))

    def expect_error(self, check: str, expected: str, call) -> InferenceServerException | None:
        entry = {"check": check, "status": None, "message": None, "expected": expected}
        self.summary["errors"].append(entry)
        try:
            call()
        except InferenceServerException as e:
            entry["status"], entry["message"] = e.status(), e.message()
            log(f"{check}: [{e.status()}] {e.message()}")
            self.expect(e.status() == expected, f"{check}: got {e.status()} ({e.message()}), want {expected}")
            return e
        self.expect(False, f"{check}: the call succeeded, want {expected}")
        return None

    def unknown_model(self) -> None:
        a = self.args
        name = a.unknown_model
        tensor = self.any_input()
        e = self.expect_error(
            "unknown_model_infer",
            NOT_FOUND,
            lambda: self.client.infer(name, [tensor], client_timeout=a.timeout),
        )
        if e is not None and e.status() == NOT_FOUND:
            self.expect(
                a.model in (e.message() or ""),
                f"unknown_model_infer: message does not name the served model {a.model!r}",
            )
        self.expect_error(
            "unknown_model_metadata",
            NOT_FOUND,
            lambda: self.client.get_model_metadata(name, client_timeout=a.timeout),
        )
        try:
            ready = self.client.is_model_ready(name, client_timeout=a.timeout)
            self.summary["unknown_model_ready"] = ready
            self.expect(ready is False, f"is_model_ready({name!r}) is {ready}, want False")
        except InferenceServerException as e:
            self.expect(False, f"is_model_ready({name!r}) raised {e}; Triton answers False")

    def bad_shape(self) -> None:
        a = self.args
        if a.bad_shape_input:
            name = a.bad_shape_input
            meta = next((t for t in (self.metadata or {}).get("inputs", []) if t["name"] == name), None)
            datatype = meta["datatype"] if meta else ("BYTES" if a.frame else "FP32")
            shape = a.bad_shape or ([1, 1] if datatype == "BYTES" else [1, 1, 1])
        elif a.bottleneck or any(t["datatype"] == "FP32" for t in (self.metadata or {}).get("inputs", [])):
            name, meta_shape = self.meta_input(a.bottleneck_input, "FP32", "bottleneck")
            datatype = "FP32"
            if a.bad_shape:
                shape = a.bad_shape
            elif a.bottleneck:
                shape = list(self.load_bottleneck(a.bottleneck[0]).shape)
                shape[-1] += 1
            else:
                shape = [1 if d < 0 else d for d in meta_shape]
                shape[-1] += 1
        else:
            name, _ = self.meta_input(a.frame_input, "BYTES", "frame")
            datatype = "BYTES"
            shape = a.bad_shape or [1, 1]
        if datatype == "BYTES":
            data = np.full(shape, b"", dtype=np.object_)
        else:
            data = np.zeros(shape, dtype=np.float32)
        tensor = grpcclient.InferInput(name, shape, datatype).set_data_from_numpy(data)
        log(f"bad_shape: input {name!r} {datatype} {shape}")
        self.expect_error(
            "bad_shape",
            INVALID_ARGUMENT,
            lambda: self.client.infer(
                a.model, [tensor], model_version=a.model_version, client_timeout=a.timeout
            ),
        )

    def wait_live(self) -> None:
        deadline = time.monotonic() + self.args.wait
        while True:
            try:
                if self.client.is_server_live(client_timeout=min(self.args.timeout, 5.0)):
                    return
            except InferenceServerException:
                pass
            if time.monotonic() >= deadline:
                return
            time.sleep(0.2)

    def run(self) -> int:
        if self.args.wait > 0:
            self.wait_live()
        try:
            self.server()
        except InferenceServerException as e:
            self.summary["unreachable"] = True
            self.summary["error"] = {"status": e.status(), "message": e.message()}
            self.failures.append(f"server at {self.args.url} not reachable: {e}")
            log(f"cannot reach {self.args.url}: {e}")
            return 3
        self.model()
        self.frames()
        self.bottlenecks()
        if not self.args.skip_unknown_model:
            self.unknown_model()
        if not self.args.skip_bad_shape:
            self.bad_shape()
        return 0 if not self.failures else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for path in [*args.frame, *args.bottleneck]:
        if not path.is_file():
            print(f"client_check: no such file: {path}", file=sys.stderr)
            return 2
    checker = Checker(args)
    try:
        code = checker.run()
    except (OSError, ValueError) as e:
        checker.failures.append(f"bad input: {e}")
        log(f"bad input: {e}")
        code = 2
    except InferenceServerException as e:
        # An RPC that should have worked failed outside the per-check handling.
        checker.failures.append(f"unexpected error: {e}")
        log(f"unexpected error: {e}")
        code = 3 if e.status() == UNAVAILABLE else 1
    finally:
        checker.client.close()
    checker.summary["ok"] = code == 0
    print(json.dumps(checker.summary, indent=2))
    return code


if __name__ == "__main__":
    sys.exit(main())
