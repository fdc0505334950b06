"""`make_bundle.py calibrate BUNDLE`: measure and write a bundle's coding tables.

A head and a tail that share a bundle share its coding tables (docs/coding-tables.md), so a
frame carries neither clipping ranges nor probability tables. This computes them for an
existing bundle from the head's features on the calibration views, without touching the
models, and measures what each costs on the held-out views:

* Calibrated affine quantization, bits 2..8: per-channel clipping ranges at the two-sided
  percentile (of P_CANDIDATES) that gives the lowest mean KL(full || split) on the
  calibration views; a static prior per bit depth (the smoothed calibration histogram,
  integers >= 1 summing to 2^16 per channel), coded with ANS (the constriction package).
* A learned factorized prior: a real CompressAI EntropyBottleneck(C) trained on x * scale_c
  with scale_c = s / std_c, coded by CompressAI itself.

Rules (all decided on the calibration views, never on the held-out ones):
* default bit depth: the lowest bits whose mean KL is within 10 % of the 8-bit level's;
* factorized gain s: the smallest of S_CANDIDATES whose mean KL (rounding x * scale_c on a
  grid offset by the channel's median, as the bottleneck will) meets that same target, so
  the two priors are compared at the same fidelity.

Writes priors.json, calibration.json (everything measured) and the manifest's
[bottleneck.quantization] section, then recomputes the bundle id as write_bundle does. With
--fixture, also writes a small cross-check fixture for cleave-codec made by CompressAI.
Fixed seeds and one torch thread: a rerun on the same machine type writes the same files.

Any bundle works, whatever its bottleneck's channel count (e.g. one `make_bundle.py split`
wrote): --calibration and --eval name its images (default: the scikit-image photographs the
bundled model was made from). --no-learned-prior skips the EntropyBottleneck, so neither
torch nor compressai is needed (numpy, onnx, onnxruntime, pillow, zstandard, constriction:
models/tools/requirements-split.txt); priors.json then has no `factorized` entry.
"""

import hashlib
import json
import pathlib
import re
import sys
import time
import tomllib

import numpy as np
import onnx

import make_bundle as mb

PRECISION = 16
BITS = range(2, 9)
P_CANDIDATES = (100.0, 99.99, 99.9, 99.5, 99.0, 98.0, 95.0)
S_CANDIDATES = (1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0, 8.0)
KL_TOLERANCE = 1.10
SMOOTHING = 0.5  # counts added to every histogram bin
EB_STEPS, EB_BATCH, EB_LR, EB_QUANTILE_LR = 4000, 8, 1e-2, 5e-2
FIXTURE_IMAGES, FIXTURE_WINDOW = 3, 16  # centre views of the first 3 eval images, 16x16 crop


def f32(v):
    """An f32 as the shortest decimal of its exact f64 value: it round-trips through f64."""
    return float(np.float32(v))


# ---------------------------------------------------------------------------------------------
# Calibrated affine quantization with static priors


def affine(x, low, high, bits):
    """(symbols, x_hat) exactly as docs/coding-tables.md says, in f32."""
    n = np.float32(2 ** bits - 1)
    low, high = low[None, :, None, None], high[None, :, None, None]
    step = (high - low) / n
    if (high <= low).any():  # a constant channel: step 1, as cleave-codec's AffineRange does
        step = np.where(high > low, step, np.float32(1))
    symbols = np.clip(np.rint((x - low) / step), 0, n)
    return symbols.astype(np.int64), (low + symbols.astype(np.float32) * step).astype(np.float32)


def static_pmf(symbols, bits):
    """Per-channel smoothed histogram as integers >= 1 summing to 2^PRECISION; the rounding
    remainder goes to each row's largest entry."""
    rows = []
    for c in range(symbols.shape[1]):
        counts = np.bincount(symbols[:, c].ravel(), minlength=2 ** bits) + SMOOTHING
        row = np.maximum(1, np.rint(counts / counts.sum() * 2 ** PRECISION)).astype(np.int64)
        row[np.argmax(row)] += 2 ** PRECISION - row.sum()
        assert row.min() >= 1 and row.sum() == 2 ** PRECISION
        rows.append(row)
    return np.stack(rows)


def ans_bytes(symbols, pmf):
    """ANS payload of each frame under the static prior (channel by channel, constriction).
    constriction's Python models are 24-bit; a 16-bit table is exact in them (perfect=True)."""
    import constriction

    models = [constriction.stream.model.Categorical(row / 2 ** PRECISION, perfect=True)
              for row in pmf]
    sizes = []
    for frame in symbols:
        coder = constriction.stream.stack.AnsCoder()
        for c in reversed(range(len(models))):
            coder.encode_reverse(frame[c].ravel().astype(np.int32), models[c])
        sizes.append(4 * len(coder.get_compressed()))
    return sizes


def bound_bytes(symbols, pmf):
    """Cross-entropy of each frame under the fixed-point prior, in bytes."""
    bits = -np.log2(pmf / 2 ** PRECISION)
    channel = np.arange(pmf.shape[0])[None, :, None, None]
    return bits[channel, symbols].sum(axis=(1, 2, 3)) / 8


def calibrate_levels(data, tail_fid, log):
    """Per bit depth: the clip percentile chosen on calibration views, its static prior, and
    what it costs on the held-out views. The ranges are percentiles of all calibration views
    and the static prior counts them all; the percentile is chosen by the KL on the views
    data["search"] picks (all of them unless --search-views)."""
    per_channel = data["calib_x"].transpose(1, 0, 2, 3).reshape(data["calib_x"].shape[1], -1)
    search_x, search_full = data["calib_x"][data["search"]], data["calib_full"][data["search"]]
    levels = []
    for bits in BITS:
        tried = []
        for p in P_CANDIDATES:
            low = np.percentile(per_channel, 100 - p, axis=1).astype(np.float32)
            high = np.percentile(per_channel, p, axis=1).astype(np.float32)
            agree, kl = tail_fid(affine(search_x, low, high, bits)[1], search_full)
            tried.append(dict(clip_percentile=p, low=low, high=high, calib_top1_agreement=agree,
                              calib_mean_kl=kl))
        best = min(tried, key=lambda t: t["calib_mean_kl"])
        low, high = best["low"], best["high"]
        pmf = static_pmf(affine(data["calib_x"], low, high, bits)[0], bits)
        symbols, x_hat = affine(data["eval_x"], low, high, bits)
        agree, kl = tail_fid(x_hat, data["eval_full"])
        level = dict(
            bits=bits, clip_percentile=best["clip_percentile"], low=low, high=high, pmf=pmf,
            calib_top1_agreement=best["calib_top1_agreement"], calib_mean_kl=best["calib_mean_kl"],
            top1_agreement=agree, mean_kl=kl,
            ans_bytes=float(np.mean(ans_bytes(symbols, pmf))),
            bound_bytes=float(np.mean(bound_bytes(symbols, pmf))),
            zstd_bytes=float(np.mean(mb.zstd_bytes(symbols.astype(np.uint8), 3))),
            candidates=[{k: t[k] for k in ("clip_percentile", "calib_top1_agreement",
                                           "calib_mean_kl")} for t in tried],
        )
        log(f"{bits} bits: p {level['clip_percentile']}, eval top-1 {agree:.4f}, KL {kl:.4f}, "
            f"ANS {level['ans_bytes']:.0f} B (bound {level['bound_bytes']:.0f}), "
            f"zstd {level['zstd_bytes']:.0f} B")
        levels.append(level)
    return levels


# ---------------------------------------------------------------------------------------------
# Learned factorized prior (CompressAI EntropyBottleneck)


def choose_gain(data, std, target_kl, tail_fid):
    """The smallest gain s whose calibration KL meets target_kl, and what each one measured."""
    tried = []
    for s in S_CANDIDATES:
        scale = (s / std).astype(np.float32)[None, :, None, None]
        y = data["calib_x"][data["search"]] * scale
        median = np.median(y, axis=(0, 2, 3), keepdims=True)
        agree, kl = tail_fid((np.rint(y - median) + median) / scale,
                             data["calib_full"][data["search"]])
        tried.append(dict(s=s, calib_top1_agreement=agree, calib_mean_kl=kl))
    ok = [t for t in tried if t["calib_mean_kl"] <= target_kl]
    return (ok[0] if ok else tried[-1])["s"], tried


def train_bottleneck(y, log):
    """EntropyBottleneck(C) fitted to y (N, C, H, W): rate (noisy, as CompressAI trains) plus
    its aux loss for the quantiles, Adam with a linear decay, then update(force=True)."""
    import torch
    from compressai.entropy_models import EntropyBottleneck

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    eb = EntropyBottleneck(y.shape[1])
    density = [p for name, p in eb.named_parameters() if name != "quantiles"]
    opt = torch.optim.Adam([{"params": density, "lr": EB_LR},
                            {"params": [eb.quantiles], "lr": EB_QUANTILE_LR}])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / EB_STEPS)
    y = torch.from_numpy(y)
    for step in range(EB_STEPS):
        _, likelihood = eb(y[torch.randint(0, len(y), (EB_BATCH,), generator=gen)])
        rate = -torch.log2(likelihood).sum() / likelihood.numel()
        aux = eb.loss()
        opt.zero_grad()
        (rate + aux).backward()
        opt.step()
        sched.step()
        if step % 1000 == 0 or step == EB_STEPS - 1:
            log(f"  step {step}: {rate.item():.3f} bits/symbol, aux loss {aux.item():.3f}")
    eb.update(force=True)
    eb.eval()
    return eb, dict(steps=EB_STEPS, batch_views=EB_BATCH, final_rate_bits=rate.item(),
                    final_aux_loss=aux.item())


def export_factorized(eb, scale, source):
    """priors.json's `factorized` entry: the bottleneck's state after update(), rows cut."""
    lengths = eb.cdf_length.tolist()
    return dict(source=source, scale=[f32(s) for s in scale],
                medians=[f32(m) for m in eb.quantiles[:, 0, 1].tolist()],
                offset=eb.offset.tolist(), cdf_length=lengths,
                quantized_cdf=[row[:n] for row, n in zip(eb.quantized_cdf.tolist(), lengths)])


def eb_symbols(eb, y):
    """What EntropyBottleneck.compress encodes, through its own code path."""
    medians = eb._extend_ndims(eb._get_medians().detach(), y.dim() - 2)
    return eb.quantize(y, "symbols", medians.expand(y.shape[0], -1, *([-1] * (y.dim() - 2))))


def escape_tokens(value, max_value):
    """CompressAI's bypass for a value outside 0..max_value-1: the count of 4-bit digits, then
    the digits, least significant first (decode order)."""
    raw = -2 * value - 1 if value < 0 else 2 * (value - max_value)
    digits = []
    while raw >> (4 * len(digits)):
        digits.append((raw >> (4 * len(digits))) & 15)
    assert len(digits) < 15  # int32 needs at most 8; longer counts would need 15-chunks
    return [len(digits), *digits]


def count_escapes(symbols, table):
    """How many symbols fall outside their channel's table (coded as escape + digits)."""
    return sum(int(((v < 0) | (v > n - 3)).sum()) for v, n in
               zip((symbols[:, c] - o for c, o in enumerate(table["offset"])), table["cdf_length"]))


def factorized_bound(symbols, table):
    """Information bound of each frame under the exported tables, escapes and bypass digits
    (4 bits each, like CompressAI's count and digits) included, in bytes."""
    sizes = np.zeros(len(symbols))
    for c, (cdf, off) in enumerate(zip(table["quantized_cdf"], table["offset"])):
        cdf, max_value = np.asarray(cdf, np.float64), len(cdf) - 2
        bits = -np.log2(np.diff(cdf) / 2 ** PRECISION)
        for i, frame in enumerate(symbols[:, c].reshape(len(symbols), -1) - off):
            inside = (frame >= 0) & (frame < max_value)
            sizes[i] += bits[frame[inside]].sum() + (~inside).sum() * bits[max_value]
            sizes[i] += sum(4 * len(escape_tokens(int(v), max_value)) for v in frame[~inside])
    return sizes / 8


def factorized(data, std, target_kl, tail_fid, log):
    import compressai
    import torch

    torch.set_num_threads(1)
    s, tried = choose_gain(data, std, target_kl, tail_fid)
    scale = (s / std).astype(np.float32)
    log(f"factorized: gain s = {s}; training EntropyBottleneck on x * s / std")
    eb, training = train_bottleneck(data["calib_x"] * scale[None, :, None, None], log)
    source = (f"compressai {compressai.__version__} EntropyBottleneck({len(scale)}) trained on "
              f"x * scale (scale = {s} / per-channel std) of the head's features on "
              f"{data['calibrated_on']}, {EB_STEPS} Adam steps, seed 0")
    table = export_factorized(eb, scale, source)
    t_scale = torch.from_numpy(scale)[None, :, None, None]
    with torch.no_grad():
        y = torch.from_numpy(data["eval_x"]) * t_scale
        symbols = eb_symbols(eb, y)
        x_hat = (eb.dequantize(symbols, eb._get_medians().detach().reshape(1, -1, 1, 1))
                 / t_scale).numpy()
        strings = eb.compress(y)
    agree, kl = tail_fid(x_hat, data["eval_full"])
    sym = symbols.numpy().astype(np.int64)
    escapes = count_escapes(sym, table)
    report = dict(gain=s, gain_candidates=tried, training=training, top1_agreement=agree,
                  mean_kl=kl, compressai_bytes=float(np.mean([len(b) for b in strings])),
                  bound_bytes=float(factorized_bound(sym, table).mean()), eval_escapes=escapes)
    log(f"factorized: eval top-1 {agree:.4f}, KL {kl:.4f}, compressai {report['compressai_bytes']:.0f}"
        f" B (bound {report['bound_bytes']:.0f}), {escapes} escaped symbols")
    return eb, table, report


# ---------------------------------------------------------------------------------------------
# Cross-check fixture for cleave-codec, made by CompressAI


def constriction_round_trip(frame, table):
    """Code a frame's symbols (C, H, W) with constriction's ANS under the exported tables and
    CompressAI's escape scheme, in CompressAI's order, and decode them back."""
    import constriction

    model = constriction.stream.model
    channel = [model.Categorical(np.diff(cdf) / 2 ** PRECISION, perfect=True)
               for cdf in table["quantized_cdf"]]
    digit = model.Uniform(16)
    tokens = []  # (model, value) in decode order
    for c, (off, n) in enumerate(zip(table["offset"], table["cdf_length"])):
        for v in (frame[c].ravel() - off).tolist():
            if 0 <= v < n - 2:
                tokens.append((channel[c], v))
            else:
                tokens += [(channel[c], n - 2)] + [(digit, t) for t in escape_tokens(v, n - 2)]
    coder = constriction.stream.stack.AnsCoder()
    for m, t in reversed(tokens):
        coder.encode_reverse(t, m)
    decoder = constriction.stream.stack.AnsCoder(coder.get_compressed())
    decoded = []
    for c, (off, n) in enumerate(zip(table["offset"], table["cdf_length"])):
        for _ in range(frame[c].size):
            v = decoder.decode(channel[c])
            if v == n - 2:
                count = decoder.decode(digit)
                raw = sum(decoder.decode(digit) << (4 * j) for j in range(count))
                v = -(raw >> 1) - 1 if raw & 1 else (raw >> 1) + n - 2
            decoded.append(v + off)
    return decoded


def write_fixture(out, eb, table, data, manifest_id, priors_sha, eval_paths, views_per_image):
    import compressai
    import torch
    from compressai import ans

    images = [pathlib.Path(p).stem for p in eval_paths[:FIXTURE_IMAGES]]
    views = [i * views_per_image for i in range(len(images))]
    lo = (data["eval_x"].shape[2] - FIXTURE_WINDOW) // 2
    window = slice(lo, lo + FIXTURE_WINDOW)
    x = data["eval_x"][views][:, :, window, window]
    # Held-out features never leave the tables' range (tail mass 1e-9); a 4th frame, the 1st
    # times 4, makes CompressAI code escapes and bypass digits too.
    x = np.ascontiguousarray(np.concatenate([x, 4 * x[:1]]))
    scale = torch.tensor(table["scale"], dtype=torch.float32)[None, :, None, None]
    with torch.no_grad():
        y = torch.from_numpy(x) * scale
        symbols = eb_symbols(eb, y)
        strings = eb.compress(y)
        y_hat = eb.decompress(strings, y.shape[2:])
    medians = torch.tensor(table["medians"])[None, :, None, None]
    assert torch.equal(y_hat, symbols.float() + medians), "decompress(compress(x)) != symbols + medians"

    # Our exported (cut) tables decode CompressAI's strings with CompressAI's own decoder ...
    indexes = np.broadcast_to(np.arange(x.shape[1])[:, None, None], x.shape[1:]).ravel().tolist()
    for s, expect in zip(strings, symbols):
        got = ans.RansDecoder().decode_with_indexes(s, indexes, table["quantized_cdf"],
                                                    table["cdf_length"], table["offset"])
        assert got == expect.ravel().tolist(), "exported tables do not decode compressai's strings"
    # ... and an independent ANS (constriction) with the same escape scheme round-trips them.
    for frame in symbols.numpy():
        assert constriction_round_trip(frame, table) == frame.ravel().tolist()

    out.mkdir(parents=True, exist_ok=True)
    x.astype("<f4").tofile(out / "features.f32")
    symbols.numpy().astype("<i4").tofile(out / "symbols.i32")
    y_hat.numpy().astype("<f4").tofile(out / "y_hat.f32")
    (out / "strings.bin").write_bytes(b"".join(strings))
    (out / "strings.json").write_text(json.dumps({"lengths": [len(s) for s in strings]}) + "\n")
    meta = dict(
        shape=list(x.shape), compressai=compressai.__version__, torch=torch.__version__,
        bundle_id=manifest_id, priors_sha256=priors_sha,
        frames=f"eval views {views} (centre views of {', '.join(images)}), "
               f"then 4 x the first (out of range: escapes); the central "
               f"{FIXTURE_WINDOW}x{FIXTURE_WINDOW} window of each feature map",
        escapes=count_escapes(symbols.numpy(), table),
        note="Made by `make_bundle.py calibrate --fixture` with the bundle's priors.json "
             "`factorized` tables. features.f32: head outputs x (little-endian f32, NCHW). "
             "symbols.i32: compressai's symbols round_half_even(x * scale - median) in f32 "
             "(x * scale first, then minus median), what EntropyBottleneck.compress encodes. "
             "strings.bin: eb.compress's byte strings, one per frame, concatenated (lengths in "
             "strings.json). y_hat.f32: eb.decompress(strings), i.e. symbols + median (still "
             "times scale: divide by scale for x_hat). Checked when written: compressai's "
             "decoder with the exported cut tables, and constriction with the same escape "
             "scheme, both give symbols.i32 back.",
    )
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# Writing the bundle


def dump_json(obj):
    """Indented JSON with each innermost list of numbers on one line."""
    text = json.dumps(obj, indent=1)
    return re.sub(r"\[\s+([-+0-9.e,\s]+?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]",
                  text) + "\n"


def quantization_section(default_bits, priors_sha, calibrated_on, levels):
    floats = lambda v: "[" + ", ".join(repr(f32(x)) for x in v) + "]"
    lines = ["[bottleneck.quantization]", f"bits = {default_bits}", 'granularity = "per_channel"',
             'codec = "ans"', 'priors = "priors.json"', f'priors_sha256 = "{priors_sha}"',
             f"calibrated_on = {mb.toml_str(calibrated_on)}", ""]
    for lv in levels:
        lines += ["[[bottleneck.quantization.levels]]", f"bits = {lv['bits']}",
                  f"clip_percentile = {lv['clip_percentile']!r}", f"low = {floats(lv['low'])}",
                  f"high = {floats(lv['high'])}", f"top1_agreement = {lv['top1_agreement']:.4f}",
                  f"mean_kl = {lv['mean_kl']:.5f}", f"payload_bytes = {round(lv['ans_bytes'])}", ""]
    return lines


def rewrite_manifest(path, section, version):
    """Replace [bottleneck.quantization] (and its levels; `make_bundle.py split` writes one
    with bits, granularity and codec only), optionally the version, and the id. A manifest
    without the section gets it at the end of its [bottleneck] table."""
    lines = path.read_text().split("\n")
    table = lambda i: lines[i].startswith("[")
    if "[bottleneck.quantization]" in lines:
        start = lines.index("[bottleneck.quantization]")
        end = next((i for i in range(start + 1, len(lines)) if table(i) and
                    not lines[i].startswith("[[bottleneck.quantization.levels]]")), len(lines))
    elif "[bottleneck]" in lines:
        start = end = next((i for i in range(lines.index("[bottleneck]") + 1, len(lines))
                            if table(i)), len(lines))
    else:
        raise SystemExit(f"{path} has no [bottleneck] table")
    text = "\n".join(lines[:start] + section + lines[end:])
    if version:
        text = re.sub(r'^version = ".*"$', f"version = {mb.toml_str(version)}", text, count=1,
                      flags=re.M)
    text = re.sub(r'^id = ".*"\n', 'id = "<pending>"\n', text, count=1, flags=re.M)
    bundle_id = hashlib.sha256(text.replace('id = "<pending>"\n', "").encode()).hexdigest()
    text = text.replace('id = "<pending>"', f'id = "{bundle_id}"', 1)
    tomllib.loads(text)
    path.write_text(text)
    return bundle_id


def image_paths(args):
    """--calibration and --eval, each defaulting to the bundled model's photographs."""
    calib, evals = args.calibration, args.eval
    if calib is None or evals is None:
        try:
            default_calib, default_eval = mb.efficientnet_images()
        except ImportError as e:
            raise SystemExit(f"{e}: the default images (the bundled model's) come from "
                             "scikit-image and scikit-learn; name your bundle's images with "
                             "--calibration and --eval") from None
        calib, evals = calib or default_calib, evals or default_eval
    calib, evals = [pathlib.Path(p) for p in calib], [pathlib.Path(p) for p in evals]
    for p in calib + evals:
        if not p.is_file():
            raise SystemExit(f"no such image: {p}")
    if {p.resolve() for p in calib} & {p.resolve() for p in evals}:
        print("warning: --calibration and --eval share images; the measured fidelity and bytes "
              "are then not held-out figures", file=sys.stderr)
    return calib, evals


def calibrate(args):
    if args.fixture and args.no_learned_prior:
        raise SystemExit("--fixture checks the learned prior: it cannot go with --no-learned-prior")
    if args.search_views is not None and args.search_views < 1:
        raise SystemExit("--search-views must be at least 1")
    start = time.time()
    log = lambda m: print(f"[{time.time() - start:6.0f} s] {m}", file=sys.stderr, flush=True)
    bundle = pathlib.Path(args.bundle)
    manifest = tomllib.loads((bundle / "manifest.toml").read_text())
    if manifest.get("task", "classification") != "classification":
        raise SystemExit(f"{bundle}: calibrate chooses clipping ranges by the KL of a classifier's "
                         f"outputs; a {manifest['task']} bundle stays uncalibrated (its frames "
                         f"carry their own 8-bit ranges, zstd)")
    spec = manifest["input"]
    prep = mb.Preprocess(spec["width"], spec["crop_fraction"], spec["mean"], spec["std"])
    calib_paths, eval_paths = image_paths(args)
    calib = mb.image_views(calib_paths, prep, args.views_per_image, seed=1)
    evals = mb.image_views(eval_paths, prep, args.views_per_image, seed=2)
    load = lambda role: mb.session(onnx.load(bundle / manifest["models"][role]["path"]))
    head, full, tail = load("head"), load("full"), load("tail")
    data = dict(calib_x=mb.run(head, calib), eval_x=mb.run(head, evals),
                calib_full=mb.run(full, calib), eval_full=mb.run(full, evals),
                calibrated_on=f"{len(calib)} views of {len(calib_paths)} calibration images")
    shape = manifest.get("bottleneck", {}).get("shape")
    if shape is not None and list(data["calib_x"].shape[1:]) != list(shape):
        raise SystemExit(f"the head outputs {list(data['calib_x'].shape[1:])}, the manifest's "
                         f"[bottleneck] shape is {shape}")
    # The percentile and gain searches run the tail 49 + 8 times on these views: all of them,
    # or --search-views of them spread evenly over the images.
    search_views = args.search_views if args.search_views and args.search_views < len(calib) else None
    data["search"] = slice(None)
    if search_views:
        data["search"] = np.linspace(0, len(calib), search_views, endpoint=False).astype(int)
        log(f"choosing clip percentiles and the gain on {search_views} of {len(calib)} "
            f"calibration views")
    tail_fid = lambda x_hat, full_logits: mb.fidelity(full_logits, mb.run(tail, list(x_hat)))
    float_calib = tail_fid(data["calib_x"], data["calib_full"])
    float_eval = tail_fid(data["eval_x"], data["eval_full"])
    log(f"{data['calibrated_on']}; {len(evals)} held-out views; unquantized split: calibration "
        f"top-1 {float_calib[0]:.4f} KL {float_calib[1]:.4f}, eval {float_eval[0]:.4f} KL "
        f"{float_eval[1]:.4f}")

    levels = calibrate_levels(data, tail_fid, log)
    constant = sorted({c for lv in levels for c in np.flatnonzero(lv["high"] <= lv["low"]).tolist()})
    if constant:
        log(f"channels {constant} are constant on the calibration views (step 1 for them)")
    target_kl = KL_TOLERANCE * levels[-1]["calib_mean_kl"]
    default_bits = next(lv["bits"] for lv in levels if lv["calib_mean_kl"] <= target_kl)

    priors = dict(format="cleave-priors", version=1, precision=PRECISION,
                  static=[dict(bits=lv["bits"], pmf=lv["pmf"].tolist()) for lv in levels])
    if not args.no_learned_prior:
        std = data["calib_x"].transpose(1, 0, 2, 3).reshape(data["calib_x"].shape[1], -1).std(1)
        if (std == 0).any():  # a constant channel: gain s (its symbols are all 0 anyway)
            std = np.where(std > 0, std, np.ones_like(std))
        eb, table, fact = factorized(data, std, target_kl, tail_fid, log)
        priors["factorized"] = table
    (bundle / "priors.json").write_text(dump_json(priors))
    priors_sha = mb.sha256(bundle / "priors.json")
    section = quantization_section(default_bits, priors_sha, data["calibrated_on"], levels)
    bundle_id = rewrite_manifest(bundle / "manifest.toml", section, args.version)
    if args.fixture:
        write_fixture(pathlib.Path(args.fixture), eb, table, data, bundle_id, priors_sha,
                      eval_paths, args.views_per_image)
        log(f"wrote the fixture in {args.fixture}")

    report = dict(
        calibrated_on=data["calibrated_on"],
        evaluated_on=f"{len(evals)} views of {len(eval_paths)} held-out images",
        unquantized=dict(calib_top1_agreement=float_calib[0], calib_mean_kl=float_calib[1],
                         top1_agreement=float_eval[0], mean_kl=float_eval[1]),
        default_bits=default_bits,
        default_bits_rule=f"lowest bits with calibration mean KL <= {KL_TOLERANCE} x the 8-bit level's",
        levels=[{k: v for k, v in lv.items() if k not in ("low", "high", "pmf")} for lv in levels],
    )
    if search_views:
        report["search_views"] = search_views
    if not args.no_learned_prior:
        report["factorized"] = fact
    (bundle / "calibration.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"default {default_bits} bits; wrote {bundle} (bundle id {bundle_id})")
