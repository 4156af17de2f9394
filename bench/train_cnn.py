"""Train the siamese U-Net change network for sub-metre RGB imagery (CPU, about 12 min each).

    pip install torch==2.13.0 && pip install -e '.[train]'
    python bench/train_cnn.py --out pipeline/models          # the shipped network
    python bench/train_cnn.py --folds bench/.cache/folds     # held-out fold networks

A network (:mod:`pipeline.detect.cnn`) learns from the cases of its datasets (``SPECS``; the
shipped one from LEVIR: 0.5 m RGB, buildings that appeared or vanished), averaged to its working
pixel size (1 m): 1,500 steps of 8 random 192² crops with date swaps, rotations, flips,
per-date gain/offset jitter and unchanged pairs made of one date twice; weighted BCE + Dice
loss, AdamW, one-cycle schedule, seeded. ``--folds`` trains one network per fold of
``bench/train_detector.py`` (the same folds: case split with LEVIR crops kept with their tiles,
and leave-one-dataset-out) that holds out some of its cases and leaves some to learn from, into
the fold's model folder, and records its held-out pixel figures in the JSON. Each folder gets
``cnn_<name>.onnx`` (ONNX, opset 17) and ``cnn_<name>.json``. The ONNX file is quantized to
int8 (static, per channel; activation ranges from the training cases at every scale the network
runs at): 1.7x faster on this machine's CPU, its change/no-change sign the float network's on
99.2-99.98 % of held-out LEVIR pixels. Training needs PyTorch (the ``train`` extra); running
the network needs only onnxruntime.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as Fn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from accuracy import iter_case_dirs, load_case  # noqa: E402
from train_detector import case_folds  # noqa: E402

from pipeline.detect import cnn  # noqa: E402

#: encoder widths (one 2x pooling between levels), training crop (work pixels) and batch
CHANNELS = (16, 32, 64, 96, 128)
CROP, BATCH = 192, 8


def conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class SiamUNet(nn.Module):
    """FC-Siam-diff: one encoder for both dates, decoder on |feature differences|."""

    def __init__(self, ch: tuple[int, ...] = CHANNELS) -> None:
        super().__init__()
        self.enc = nn.ModuleList()
        cin = 3
        for c in ch:
            self.enc.append(conv(cin, c))
            cin = c
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for i in range(len(ch) - 1, 0, -1):
            self.up.append(nn.ConvTranspose2d(ch[i], ch[i - 1], 2, stride=2))
            self.dec.append(conv(2 * ch[i - 1], ch[i - 1]))
        self.head = nn.Conv2d(ch[0], 1, 1)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for i, e in enumerate(self.enc):
            if i:
                x = Fn.max_pool2d(x, 2)
            x = e(x)
            feats.append(x)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.encode(x[:, :3]), self.encode(x[:, 3:])
        d = [torch.abs(p - q) for p, q in zip(a, b, strict=True)]
        y = d[-1]
        for k, (up, dec) in enumerate(zip(self.up, self.dec, strict=True)):
            y = up(y)
            y = dec(torch.cat([y, d[-2 - k]], 1))
        return self.head(y)


@dataclass(frozen=True)
class Spec:
    """One network: the datasets it learns from and the pixel sizes it serves."""

    name: str
    datasets: tuple[str, ...]
    work_res_m: float
    res_range_m: tuple[float, float]
    steps: int
    licence: str


#: share of training crops made of one date twice (plus noise and the usual gain/offset
#: jitter), labelled unchanged: real pairs never show it, and without them a network called
#: identical images changed everywhere
NO_CHANGE_PAIRS = 0.1
#: weight of a network's logit beside the pixel model's margin: its logits run to about ±8, and
#: on held-out LEVIR tiles (case-split fold 1) half weight gave F1 0.465 (P 0.64) vs 0.444 at 1
WEIGHT = 0.5
#: the network also runs at twice its working pixel size, a pixel's logit being the larger:
#: on held-out LEVIR (fold 1) F1 0.465 -> 0.487, finding large roofs wider than its view
SCALES = (1.0, 2.0)
#: how the shipped ONNX file holds the network (see :func:`quantize`)
QUANTIZED = ("int8: static QDQ, 7-bit weights per channel, activations min/max over the "
             "training cases")
#: the networks. Sub-metre imagery (LEVIR: 0.5 m, buildings that appeared or vanished) worked
#: at 1 m, and serves imagery up to 4.5 m (GF-1, ZY-3, SPOT 6/7, PlanetScope) enlarged to it
#: (:func:`pipeline.detect.cnn.predict`): LEVIR averaged to 2.2 m, held out, F1 0.168 without
#: it (the 10 m class's threshold) and 0.404 at the sub-metre class's (precision 0.300);
#: 0.594 (precision 0.698) with it; averaged to 3.3 m (case-split fold 0), 0.012 at the 10 m
#: class's threshold without it, 0.572 at the sub-metre class's with it. A 10 m network on OSCD
#: (reflectance and 8-bit renderings) was tried and dropped: added to the pixel model on
#: held-out case-split fold 1 it lowered OSCD-RGB F1 0.528 -> 0.484 (OSCD 0.724 -> 0.747).
SPECS = (
    Spec("rgb_1m", ("levir",), 1.0, (0.25, 4.5), 1500,
         "weights derive from LEVIR-CD (research use only)"),
)


def prepare(case, work_res_m: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Model input, target and weight of a case, averaged to the working pixel size and padded
    (zero weight) to at least one training crop."""
    f = cnn.factor(case.res_m, work_res_m)
    rgb = [case.roles.index(r) for r in ("red", "green", "blue")]
    x = cnn.downsample(cnn.model_input(case.before[rgb], case.after[rgb], case.valid), f)
    w = ((case.label != 255) & case.valid).astype(np.float32)
    y = (cnn.downsample((case.label == 1).astype(np.float32), f) >= 0.5).astype(np.float32)
    w = cnn.downsample(w, f)
    ph, pw = max(0, CROP - y.shape[0]), max(0, CROP - y.shape[1])
    if ph or pw:
        pad = ((0, ph), (0, pw))
        x = np.pad(x, ((0, 0), *pad))
        y, w = np.pad(y, pad), np.pad(w, pad)
    return x.astype(np.float32), y, w.astype(np.float32)


def batches(data, rng: np.random.Generator, n: int, size: int):
    weights = np.array([x.shape[1] * x.shape[2] for x, _, _ in data], float)
    weights /= weights.sum()
    xs, ys, ws = [], [], []
    for _ in range(n):
        x, y, w = data[rng.choice(len(data), p=weights)]
        h, wd = y.shape
        i = rng.integers(0, h - size + 1)
        j = rng.integers(0, wd - size + 1)
        xc = x[:, i:i + size, j:j + size].copy()
        yc, wc = y[i:i + size, j:j + size].copy(), w[i:i + size, j:j + size].copy()
        if rng.random() < 0.5:  # swap dates: a vanished building is change too
            xc = np.concatenate([xc[3:], xc[:3]])
        if rng.random() < NO_CHANGE_PAIRS:  # one date twice, with sensor noise: no change
            xc[3:] = xc[:3] + rng.normal(0.0, 0.02, xc[:3].shape).astype(np.float32)
            yc[:] = 0.0
        for d in (0, 3):  # per-date gain/offset jitter: illumination differences are not change
            xc[d:d + 3] = xc[d:d + 3] * rng.uniform(0.8, 1.2) + rng.uniform(-0.1, 0.1)
        k = rng.integers(4)
        xc, yc, wc = (np.rot90(xc, k, (1, 2)), np.rot90(yc, k), np.rot90(wc, k))
        if rng.random() < 0.5:
            xc, yc, wc = xc[:, :, ::-1], yc[:, ::-1], wc[:, ::-1]
        xs.append(np.ascontiguousarray(xc))
        ys.append(np.ascontiguousarray(yc))
        ws.append(np.ascontiguousarray(wc))
    return (torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))[:, None],
            torch.from_numpy(np.stack(ws))[:, None])


def loss_fn(logits: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    bce = Fn.binary_cross_entropy_with_logits(logits, y, weight=w * (1 + 2 * y), reduction="sum")
    bce = bce / w.sum().clamp(min=1)
    p = torch.sigmoid(logits) * w
    dice = 1 - (2 * (p * y).sum() + 1) / (p.sum() + (y * w).sum() + 1)
    return bce + dice


def train(data, steps: int, seed: int, size: int = CROP, batch: int = BATCH) -> SiamUNet:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = SiamUNet()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    t0 = time.perf_counter()
    for s in range(steps):
        x, y, w = batches(data, rng, batch, size)
        loss = loss_fn(net(x), y, w)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if s % 50 == 0:
            print(f"step {s} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f}s)",
                  flush=True)
    return net.eval()


def export(net: SiamUNet, onnx: Path) -> None:
    """The float network as ONNX (opset 17), any batch size and image size."""
    torch.onnx.export(net, torch.zeros(1, 6, 128, 128), str(onnx), input_names=["x"],
                      output_names=["logit"], opset_version=17, dynamo=False,
                      dynamic_axes={"x": {0: "n", 2: "h", 3: "w"},
                                    "logit": {0: "n", 2: "h", 3: "w"}})


def calibration(cases: list, work_res_m: float) -> list[np.ndarray]:
    """Network inputs ``(1, 6, h, w)`` of whole training cases at every scale it runs at, as
    :func:`pipeline.detect.cnn.predict` makes them: the activation ranges int8 must hold."""
    out = []
    for c in cases:
        rgb = [c.roles.index(r) for r in ("red", "green", "blue")]
        x = cnn.model_input(c.before[rgb], c.after[rgb], c.valid)
        for s in SCALES:
            xs = cnn.downsample(x, cnn.factor(c.res_m, work_res_m * s)).astype(np.float32)
            out.append(cnn.pad_to(xs, 2 ** (len(CHANNELS) - 1))[None])
    return out


def quantize(src: Path, dst: Path, inputs: list[np.ndarray]) -> None:
    """``src`` (float ONNX) as a static int8 network at ``dst``: weights per output channel in
    7 bits (CPUs without VNNI multiply u8 by s8 in 16-bit pairs that saturate at full range, so
    their results would differ from this machine's), activations by the min/max they reach
    on ``inputs``."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter({"x": x} for x in inputs)

        def get_next(self) -> dict | None:
            return next(self.it, None)

    src, dst = src.resolve(), dst.resolve()
    # onnxruntime leaves scratch files (shape inference, external data) in the working directory
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):
        pre = Path(tmp) / "pre.onnx"  # shapes inferred and graph folded, as quantization wants
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, reduce_range=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def held_out(cases: list, out: Path) -> dict[str, float]:
    """Pixel precision, recall and F1 of the network alone (its vote > 0) on ``cases``."""
    tp = fp = fn = 0
    for c in cases:
        net = cnn.net_for(out, c.res_m)
        rgb = [c.roles.index(r) for r in ("red", "green", "blue")]
        p = net.vote(c.before[rgb], c.after[rgb], c.valid, c.res_m) > 0
        lab, y = (c.label != 255) & c.valid, c.label == 1
        tp += int((p & y & lab).sum())
        fp += int((p & ~y & lab).sum())
        fn += int((~p & y & lab).sum())
    pr, rc = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    return {"precision": pr, "recall": rc, "f1": 2 * pr * rc / max(pr + rc, 1e-9)}


def fit(spec: Spec, train_cases: list, test_cases: list, out: Path, seed: int,
        steps: int | None = None) -> None:
    """Train ``spec`` on ``train_cases`` and save it into ``out`` (held-out figures on
    ``test_cases`` in its JSON)."""
    steps = steps or spec.steps
    net = train([prepare(c, spec.work_res_m) for c in train_cases], steps, seed)
    meta = {"name": spec.name, "trained_on": [f"{c.dataset}/{c.name}" for c in train_cases],
            "test_cases": [f"{c.dataset}/{c.name}" for c in test_cases],
            "res_range_m": list(spec.res_range_m), "work_res_m": spec.work_res_m,
            "threshold": 0.0, "weight": WEIGHT, "scales": list(SCALES),
            "multiple": 2 ** (len(CHANNELS) - 1), "channels": list(CHANNELS), "crop": CROP,
            "batch": BATCH, "steps": steps, "seed": seed,
            "licence": spec.licence, "quantized": QUANTIZED}
    out.mkdir(parents=True, exist_ok=True)
    onnx, js = cnn.paths(out, spec.name)
    with tempfile.TemporaryDirectory() as tmp:
        export(net, Path(tmp) / "float.onnx")
        quantize(Path(tmp) / "float.onnx", onnx, calibration(train_cases, spec.work_res_m))
    js.write_text(json.dumps(meta, indent=1))
    if test_cases:
        meta["held_out"] = held_out(test_cases, out)
        js.write_text(json.dumps(meta, indent=1))
        print(f"{out} {spec.name}: held out {meta['held_out']}", flush=True)


def fold_plan(names: list, seed: int) -> list[tuple[str, set[int]]]:
    """``(folder, test indices)`` of every fold of ``bench/train_detector.py``: the case split
    (``cases/<k>``) and leave-one-dataset-out (``lodo/<dataset>``)."""
    sets = {n.dataset for n in names}
    plan = [(f"cases/{k}", set(t)) for k, t in case_folds(names, sets, seed)]
    plan += [(f"lodo/{d}", {i for i, n in enumerate(names) if n.dataset == d})
             for d in sorted(sets)]
    return plan


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=Path, default=ROOT.parent / "shared" / "data" / "cases")
    ap.add_argument("--out", type=Path, help="folder for the networks trained on every case")
    ap.add_argument("--folds", type=Path, help="folder of fold model folders "
                    "(<folds>/cases/<k>/, <folds>/lodo/<dataset>/)")
    ap.add_argument("--only", help="only these folds or networks (comma-separated, e.g. "
                    "cases/1,rgb_1m), for experiments")
    ap.add_argument("--steps", type=int, help="training steps (default: each network's)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    only = set(args.only.split(",")) if args.only else set()
    torch.set_num_threads(2)
    dirs = iter_case_dirs(args.cases)
    # the folds are those of bench/train_detector.py, drawn over every dataset's case groups
    names = [SimpleNamespace(dataset=p.parent.name, name=p.name) for p in dirs]
    loaded: dict[int, object] = {}

    def get(i: int):
        if i not in loaded:
            loaded[i] = load_case(dirs[i])
        return loaded[i]

    plan = fold_plan(names, args.seed) if args.folds else []
    plan = [(args.folds / f, t) for f, t in plan] + ([(args.out, set())] if args.out else [])
    folds_asked = {o for o in only if "/" in o}
    nets_asked = only - folds_asked
    for spec in SPECS:
        if nets_asked and spec.name not in nets_asked:
            continue
        mine = [i for i, n in enumerate(names) if n.dataset in spec.datasets]
        for folder, test in plan:
            if folds_asked and test and f"{folder.parent.name}/{folder.name}" not in folds_asked:
                continue
            tr, te = [i for i in mine if i not in test], [i for i in mine if i in test]
            if not tr or (test and not te):  # nothing to learn from, or nothing of ours held out
                continue
            fit(spec, [get(i) for i in tr], [get(i) for i in te], folder, args.seed, args.steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
