#!/usr/bin/env python3
"""Expected boxes for engine/tests/detection.rs, from ONNX Runtime and the numpy DB
postprocessing (detection.py: the same steps as engine/src/detect.rs).

    python models/tools/detection_reference.py --bundle /tmp/ppocr-det \\
        --image models/samples/detection/text-coffee.png \\
        --out engine/tests/data/detection/text-coffee.toml

Runs the bundle's full.onnx on the image (preprocessed as the manifest says, as
cleave-engine's Preprocessor does), postprocesses the map with the manifest's [detection]
parameters and writes the boxes as TOML (the engine reads TOML already; no JSON crate is
needed for its tests). It also runs head -> 8-bit per-channel quantization (frame ranges,
as an uncalibrated bundle's frames carry them) -> tail and records how the split's boxes
agree with the full model's, and it checks that the test's tolerances would reject
postprocessing that is wrong in a plausible way (no unclip, box-mean scores, another
threshold, 4-connectivity): each variant must fail the test's own matching rule.

The fixture depends on full.onnx, the image and the parameters only, not on the cut: any
`make_bundle.py ppocr-det --size 480` bundle checks against it.
"""

import argparse
import hashlib
import pathlib
import sys
import tomllib

import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))

import detection  # noqa: E402
import make_bundle as mb  # noqa: E402

# The test's rule: every expected box matched one-to-one at IoU >= BOX_IOU with a score
# within SCORE_TOLERANCE, and no extra boxes.
BOX_IOU = 0.9
SCORE_TOLERANCE = 0.01


def matches_fixture(expected, found):
    """The test's rule, in Python: same count, greedy one-to-one match by IoU."""
    if len(expected) != len(found):
        return False, f"{len(found)} boxes instead of {len(expected)}"
    pairs = sorted(((detection.box_iou(e, f), i, j) for i, e in enumerate(expected)
                    for j, f in enumerate(found)), reverse=True)
    used_e, used_f = set(), set()
    for iou, i, j in pairs:
        if i in used_e or j in used_f or iou < BOX_IOU:
            continue
        if abs(expected[i][4] - found[j][4]) > SCORE_TOLERANCE:
            continue
        used_e.add(i)
        used_f.add(j)
    missing = len(expected) - len(used_e)
    return missing == 0, f"{missing} of {len(expected)} boxes unmatched"


def four_connected_boxes(prob, params, size):
    """The same postprocessing with 4-connectivity, by splitting the map's diagonal-only
    links: a variant the test must tell apart (on maps where it matters)."""
    mask = prob > np.float32(params["binarize_threshold"])
    # Label 4-connected components by flood fill (small maps only; this is a check).
    h, w = mask.shape
    labels = np.full((h, w), -1, np.int64)
    count = 0
    for y, x in zip(*np.nonzero(mask)):
        if labels[y, x] >= 0:
            continue
        stack = [(y, x)]
        labels[y, x] = count
        while stack:
            cy, cx = stack.pop()
            for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and labels[ny, nx] < 0:
                    labels[ny, nx] = count
                    stack.append((ny, nx))
        count += 1
    boxes = []
    for k in range(count):
        # Each 4-component alone through the real postprocessing.
        alone = np.where(labels == k, prob, 0).astype(np.float32)
        boxes += detection.db_boxes(alone, params, size, size)
    boxes.sort(key=lambda b: -b[4])
    kept = []
    for b in boxes:
        if len(kept) < params["max_detections"] and all(
                detection.box_iou(b, k) <= params["nms_iou"] for k in kept):
            kept.append(b)
    return kept


def fmt(v):
    return repr(float(v))


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True)
    p.add_argument("--image", default="models/samples/detection/text-coffee.png",
                   help="relative to the repository root")
    p.add_argument("--out", required=True)
    args = p.parse_args()

    bundle = pathlib.Path(args.bundle)
    manifest = tomllib.loads((bundle / "manifest.toml").read_text())
    if manifest["task"] != "detection":
        raise SystemExit(f"{bundle}: task is {manifest['task']!r}, not detection")
    spec, params = manifest["input"], dict(manifest["detection"])
    params.pop("fidelity", None)
    if spec["width"] != spec["height"]:
        raise SystemExit("make_bundle.py makes square inputs only")
    size = spec["width"]
    prep = mb.Preprocess(size, spec["crop_fraction"], spec["mean"], spec["std"])
    image_path = ROOT / args.image
    x = prep.center(Image.open(image_path).convert("RGB"))[None]

    load = lambda role: mb.session(onnx.load(bundle / manifest["models"][role]["path"]))
    full_map = load("full").run(None, {"image": x})[0]
    boxes = detection.db_boxes(full_map[0, 0], params, size, size)
    z = load("head").run(None, {"image": x})[0]
    z_hat, symbols = mb.quantize_v0(z)
    tail = load("tail")
    split_map = tail.run(None, {"bottleneck": z_hat})[0]
    split_boxes = detection.db_boxes(split_map[0, 0], params, size, size)
    f1, best = detection.box_agreement([boxes], [split_boxes])
    mae = float(np.abs(full_map - split_map).mean())
    frame_bytes = mb.zstd_bytes(symbols, 19)[0]
    print(f"full: {len(boxes)} boxes; split (8-bit per channel): {len(split_boxes)} boxes, "
          f"F1@0.5 {f1:.3f}, mean best IoU {best:.3f}, map MAE {mae:.5f}, "
          f"zstd payload {frame_bytes} bytes")

    ok, why = matches_fixture(boxes, boxes)
    assert ok, why
    variants = {
        "no unclip": detection.db_boxes(full_map[0, 0], {**params, "unclip_ratio": 0.0},
                                        size, size),
        "score over the box": detection.db_boxes(full_map[0, 0], params, size, size, "bbox"),
        "binarize at 0.5": detection.db_boxes(
            full_map[0, 0], {**params, "binarize_threshold": 0.5}, size, size),
        "4-connectivity": four_connected_boxes(full_map[0, 0], params, size),
    }
    caught = []
    for name, found in variants.items():
        ok, why = matches_fixture(boxes, found)
        print(f"variant {name!r}: {'PASSES (not caught)' if ok else 'rejected'} ({why})")
        if not ok:
            caught.append(name)

    full_sha = hashlib.sha256((bundle / "full.onnx").read_bytes()).hexdigest()
    lines = [
        "# Expected boxes of the PP-OCRv4 detection bundle's full model on one image, made by",
        "# ONNX Runtime and the numpy DB postprocessing (models/tools/detection_reference.py).",
        "# engine/tests/detection.rs matches its own boxes (tract, detect.rs) against these.",
        f'image = "{args.image}"',
        f'full_sha256 = "{full_sha}"',
        f'onnxruntime = "{ort.__version__}"',
        f"box_iou = {BOX_IOU}",
        f"score_tolerance = {SCORE_TOLERANCE}",
        f"variants_rejected = [{', '.join(mb.toml_str(c) for c in caught)}]",
        "",
        "[input]",
        f"width = {spec['width']}",
        f"height = {spec['height']}",
        f"crop_fraction = {fmt(spec['crop_fraction'])}",
        f"resize = {mb.toml_str(spec['resize'])}",
        f"mean = [{', '.join(fmt(m) for m in spec['mean'])}]",
        f"std = [{', '.join(fmt(s) for s in spec['std'])}]",
        "",
        "[detection]",
        f"kind = {mb.toml_str(params['kind'])}",
        *[f"{k} = {fmt(params[k])}" for k in
          ("binarize_threshold", "box_threshold", "unclip_ratio", "nms_iou", "min_box_side")],
        f"max_detections = {int(params['max_detections'])}",
        "",
        "[map]",
        "# ONNX Runtime's probability map: its mean and how many pixels pass the threshold.",
        f"mean = {fmt(full_map.mean(dtype=np.float64))}",
        f"foreground = {int((full_map > np.float32(params['binarize_threshold'])).sum())}",
        "",
        "[split]",
        "# head -> 8-bit per-channel affine (frame ranges) -> tail, in ONNX Runtime, this bundle.",
        f"split_at = {mb.toml_str(manifest['bottleneck']['split_at'])}",
        f"shape = {manifest['bottleneck']['shape']}",
        f"boxes = {len(split_boxes)}",
        f"box_f1 = {f1:.4f}",
        f"mean_best_iou = {best:.4f}",
        f"map_mae = {mae:.6f}",
        "",
    ]
    for b in boxes:
        lines += [
            "[[boxes]]",
            f"x0 = {fmt(b[0])}",
            f"y0 = {fmt(b[1])}",
            f"x1 = {fmt(b[2])}",
            f"y1 = {fmt(b[3])}",
            f"score = {fmt(b[4])}",
            "label = 0",
            "",
        ]
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    tomllib.loads(out.read_text())
    print(f"wrote {out}: {len(boxes)} boxes; the test's rule rejects {len(caught)} of "
          f"{len(variants)} wrong variants")


if __name__ == "__main__":
    main()
