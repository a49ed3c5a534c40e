"""Speed and memory benchmarks, printed as a table of ratios and written as JSON: ``kdgraph bench``.

Every figure compares two things measured side by side in one process on the same inputs: the two are
run alternately (the order flips every repetition), after warm-up, and the figure is the median of the
per-repetition ratios (medians of the times are reported too). Figures (targets in brackets):

(a) ``taps``: a forward of the teacher (WRN-28-4), of the student (WRN-16-2) and of torchvision's
    EfficientNet-B0 tapped at their stage-end pre-activation positions (:func:`kdgraph.tap`, what
    margin_relu reads) against the plain eager forward, in eval mode under ``no_grad`` (how a teacher
    runs) and in train mode with autograd recording (how a student runs; the graph is dropped, no
    backward). On the CPU, one more row runs in a fresh interpreter through the plain Python API only --
    no kdgraph command, so no allocator setting but the one a tapped model applies itself -- for a
    ResNet-like model defined outside kdgraph (:class:`OutsideResNet`, width 48, batch ``--batch`` / 2,
    eval, 3 pre-ReLU taps); it also reports that interpreter's eager forward before anything was
    tapped. [<= 1.05]
(b) ``step``: one distillation step -- teacher forward, student forward, loss, backward, SGD step --
    through :class:`kdgraph.Distiller` against the same step written by hand without kdgraph: explicit
    WRN forwards over the same modules returning their features, the loss inline in torch ops. For
    ``kd`` (0.8 CE + 0.2 T^2 KL, T = 4), ``at`` (CE + 1000 x AT on the three group outputs) and
    ``margin_relu`` (CE + 1e-3 x Heo et al. on the pre-ReLU stage ends, 1x1 conv + BN connectors, the
    teacher's BN-derived margins, teacher BN on batch statistics). The same models (the reference gets
    copies of kdgraph's connectors), one batch; both losses are computed once on the same weights and
    their relative difference reported. [<= 1.05]
(c) ``data``: images per second of the per-sample torchvision pipeline (a CIFAR-10 dataset of synthetic
    uint8 images, reflect-pad 4 + random crop + flip + ToTensor + Normalize, ``DataLoader`` with
    ``num_workers=0``) against the batched tensor pipeline of ``loader: tensor``
    (:class:`kdgraph.data.tensor.TensorLoader`) producing the same batches. On the CPU both get one
    torch thread (a DataLoader worker process has one; the figure is images per second per core); with
    CUDA the tensor pipeline is also timed on the GPU, against the same per-sample pipeline (its batches
    left on the CPU: no copy to the GPU is counted for it). [>= 5]
(d) ``memory``: peak memory of a kd step (teacher + student) against a student-only (CE) step. CUDA:
    ``torch.cuda.max_memory_allocated`` over the step. CPU: the memory held before the step (every
    tensor of the models, optimiser state and batch) plus the peak of the running sum of the CPU
    allocator's allocations and frees during the step, as recorded by ``torch.profiler`` with
    ``profile_memory`` (oneDNN's internal scratch buffers are not counted). No target; reported.

On the CPU the step figures (b, d) use half of ``--batch`` (64 by default) to keep the run to minutes.
``kdgraph bench --help`` lists the options (models included, for quick runs).
"""
from __future__ import annotations

import copy
import datetime
import json
import math
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..distiller import Distiller
from ..errors import UserError
from ..graph import layers, stage_ends, tap
from ..models import build_model
from ..models.wrn import WideResNet
from .runtime import pick_device

FIGURES = "abcd"
TARGETS = {"a": ("<=", 1.05), "b": ("<=", 1.05), "c": (">=", 5.0), "d": None}
NUM_CLASSES = 100
LOSSES = {  # the loss lists of specs/{kd,at,margin_relu}_wrn-28-4_wrn-16-2.yaml
    "kd": [{"method": "ce", "weight": 0.8}, {"method": "kd", "weight": 0.2, "temperature": 4}],
    "at": [{"method": "ce", "weight": 1.0}, {"method": "at", "weight": 1000}],
    "margin_relu": [{"method": "ce", "weight": 1.0}, {"method": "margin_relu", "weight": 1e-3}],
}


# ------------------------------------------------------------------------------------------ timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def interleaved(a: Callable, b: Callable, reps: int, device: torch.device, warmup: int = 2) -> dict:
    """Time ``a`` and ``b`` alternately (the order flips each repetition): medians and the median of b/a."""
    for _ in range(warmup):
        a(), b()
    ta, tb = [], []
    for i in range(reps):
        if i % 2 == 0:
            ta.append(_time(a, device))
            tb.append(_time(b, device))
        else:
            tb.append(_time(b, device))
            ta.append(_time(a, device))
    return {"a_s": statistics.median(ta), "b_s": statistics.median(tb),
            "ratio": statistics.median(y / x for x, y in zip(ta, tb)), "a_all_s": ta, "b_all_s": tb}


@contextmanager
def threads(n: int | None):
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _models(teacher: str, student: str, device: torch.device, seed: int = 0):
    torch.manual_seed(seed)
    t = build_model(teacher, num_classes=NUM_CLASSES)
    s = build_model(student, num_classes=NUM_CLASSES)
    with torch.no_grad():  # a "trained" teacher: BN affine and statistics away from their init values
        for m in t.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.5)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    for p in t.parameters():
        p.requires_grad_(False)
    return t.to(device).eval(), s.to(device).train()


# ------------------------------------------------------------------------------- (a) tap overhead
def pre_relu_taps(model: nn.Module) -> list[str]:
    """The stage-end pre-ReLU positions (``positions: auto`` of margin_relu)."""
    return stage_ends(layers(model, (3, 32, 32)), pre=True)


TAP_MODELS = ("torchvision:efficientnet_b0",)  # tapped in (a) besides the teacher and the student


def _tap_row(model: nn.Module, mode: str, x: torch.Tensor, reps: int, device: torch.device) -> dict:
    """Eager against tapped forward of ``model`` in ``mode`` (eval: under no_grad; train: with autograd)."""
    model.train(mode == "train")
    names = pre_relu_taps(model)
    tapped = tap(model, names)
    grad = mode == "train"

    def eager():
        with torch.set_grad_enabled(grad):
            return model(x)

    def tapped_fwd():
        with torch.set_grad_enabled(grad):
            return tapped(x)

    r = interleaved(eager, tapped_fwd, reps, device)
    return {"mode": mode, "grad": grad, "taps": names, "batch": len(x), "eager_ms": 1e3 * r["a_s"],
            "tapped_ms": 1e3 * r["b_s"], "ratio": r["ratio"], "raw_s": {"eager": r["a_all_s"], "tapped": r["b_all_s"]},
            "how": next(iter(tapped.how.values()))}


def figure_a(*, teacher: str, student: str, reps: int, batch: int, device: torch.device) -> list[dict]:
    t, s = _models(teacher, student, device)
    x = torch.randn(batch, 3, 32, 32, device=device)
    rows = [{"role": role, "model": name, **_tap_row(model, mode, x, reps, device)}
            for role, name, model, mode in (("teacher", teacher, t, "eval"), ("student", student, s, "eval"),
                                            ("student", student, s, "train"))]
    t.eval()
    s.train()
    for name in TAP_MODELS:
        torch.manual_seed(0)
        model = build_model(name, num_classes=NUM_CLASSES).to(device)
        rows += [{"role": "other", "model": name, **_tap_row(model, mode, x, reps, device)} for mode in ("eval", "train")]
    if device.type == "cpu":
        rows.append(plain_api_row(reps, max(2, batch // 2)))
    return rows


class OutsideResNet(nn.Module):
    """A ResNet-like model as a user writes it, outside kdgraph: width 48, three stages of two basic blocks
    with in-place ReLUs and ``+=`` residuals, for the plain-API row of figure (a)."""

    def __init__(self, width: int = 48, num_classes: int = 10):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True))
        self.layer1 = nn.Sequential(_Basic(w, w, 1), _Basic(w, w, 1))
        self.layer2 = nn.Sequential(_Basic(w, 2 * w, 2), _Basic(2 * w, 2 * w, 1))
        self.layer3 = nn.Sequential(_Basic(2 * w, 4 * w, 2), _Basic(4 * w, 4 * w, 1))
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x):
        return self.fc(self.layer3(self.layer2(self.layer1(self.stem(x)))).mean((2, 3)))


class _Basic(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.down = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.down is None else self.down(x)
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        out += identity
        return self.relu(out)


def plain_api_row(reps: int, batch: int) -> dict:
    """The plain-API row of figure (a), measured in a fresh interpreter (:func:`_plain_api_child`)."""
    import subprocess

    code = f"from kdgraph.app.bench import _plain_api_child; _plain_api_child({reps}, {batch}, {torch.get_num_threads()})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"the plain-API benchmark process failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _plain_api_child(reps: int, batch: int, n_threads: int) -> None:
    """Print the plain-API row as JSON: eager alone first (the interpreter as the user left it), then eager
    against tapped, alternately, through ``kdgraph.tap`` only."""
    from .. import allocator

    torch.set_num_threads(n_threads)
    torch.manual_seed(0)
    model = OutsideResNet().eval()
    x = torch.randn(batch, 3, 32, 32)
    with torch.no_grad():
        before = interleaved(lambda: model(x), lambda: model(x), reps, torch.device("cpu"))
        row = _tap_row(model, "eval", x, reps, torch.device("cpu"))
    print(json.dumps({"role": "plain API, fresh interpreter", "model": "OutsideResNet", **row,
                      "eager_before_tap_ms": 1e3 * statistics.median(before["a_all_s"] + before["b_all_s"]),
                      "allocator_tuned": bool(allocator._tuned)}))


# ------------------------------------------------------------------------- (b) hand-written steps
# What a researcher writes without kdgraph: WRN forwards over the model's own modules that also return the
# features a method needs, and the losses inline. Written for kdgraph.models.wrn.WideResNet.
def _block_after_bn1(block, x: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """The rest of a pre-activation block, given its input ``x`` and ``pre = block.bn1(x)`` (kept intact)."""
    out = F.relu(pre)  # not in place: ``pre`` is a feature
    if block.shortcut is not None:
        x = out
    out = block.conv2(block.relu2(block.bn2(block.conv1(out))))
    return (x if block.shortcut is None else block.shortcut(x)) + out


def wrn_logits(m: WideResNet, x: torch.Tensor) -> torch.Tensor:
    return m(x)


def wrn_groups(m: WideResNet, x: torch.Tensor):
    """Logits and the three group (stage) outputs, for AT."""
    g1 = m.block1(m.conv1(x))
    g2 = m.block2(g1)
    g3 = m.block3(g2)
    logits = m.fc(torch.flatten(m.avgpool(m.relu(m.bn1(g3))), 1))
    return logits, [g1, g2, g3]


def wrn_pre_relu(m: WideResNet, x: torch.Tensor):
    """Logits and the pre-ReLU values at the ends of the three stages, for margin_relu."""
    x = m.block1(m.conv1(x))
    p1 = m.block2[0].bn1(x)
    x = m.block2[1:](_block_after_bn1(m.block2[0], x, p1))
    p2 = m.block3[0].bn1(x)
    x = m.block3[1:](_block_after_bn1(m.block3[0], x, p2))
    p3 = m.bn1(x)
    logits = m.fc(torch.flatten(m.avgpool(F.relu(p3)), 1))
    return logits, [p1, p2, p3]


def heo_margin(bn: nn.BatchNorm2d) -> torch.Tensor:
    """E[x | x < 0] for x ~ N(beta, gamma^2) per channel; -3|gamma| where P(x < 0) <= 0.001 (official code)."""
    s, m = bn.weight.detach().double().abs(), bn.bias.detach().double()
    cdf = 0.5 * (1 + torch.erf(-m / s / math.sqrt(2)))
    pdf = torch.exp(-(m / s) ** 2 / 2) / math.sqrt(2 * math.pi)
    return torch.where(cdf > 1e-3, m - s * pdf / cdf.clamp_min(1e-3), -3 * s).float()


def _attention(f: torch.Tensor) -> torch.Tensor:
    return F.normalize(f.pow(2).mean(1).view(f.size(0), -1))


class Reference(nn.Module):
    """A hand-written distillation step for one method: ``loss = ref(x, y)``."""

    def __init__(self, method: str, student: WideResNet, teacher: WideResNet, connectors: list[nn.Module]):
        super().__init__()
        self.method, self.student, self.teacher = method, student, teacher
        self.connectors = nn.ModuleList(connectors)
        if method == "margin_relu":
            bns = [teacher.block2[0].bn1, teacher.block3[0].bn1, teacher.bn1]
            for i, bn in enumerate(bns):
                self.register_buffer(f"margin{i}", heo_margin(bn).view(1, -1, 1, 1))

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        if self.method == "margin_relu":  # the teacher's BN on batch statistics, as Heo et al.
            for m in self.teacher.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.train()
                    m.momentum = 0.0
        return self

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.method == "kd":
            with torch.no_grad():
                t_logits = wrn_logits(self.teacher, x)
            logits = wrn_logits(self.student, x)
            T = 4.0
            kl = F.kl_div(F.log_softmax(logits / T, 1), F.softmax(t_logits / T, 1), reduction="batchmean")
            return 0.8 * F.cross_entropy(logits, y) + 0.2 * kl * T * T
        if self.method == "at":
            with torch.no_grad():
                _, t_feats = wrn_groups(self.teacher, x)
            logits, feats = wrn_groups(self.student, x)
            at = sum((_attention(s) - _attention(t)).pow(2).mean() for s, t in zip(feats, t_feats))
            return F.cross_entropy(logits, y) + 1000 * at
        with torch.no_grad():
            _, t_feats = wrn_pre_relu(self.teacher, x)
        logits, feats = wrn_pre_relu(self.student, x)
        n, total = len(feats), 0.0
        for i, (s, t, connect) in enumerate(zip(feats, t_feats, self.connectors)):
            s = connect(s)
            t = torch.max(t, getattr(self, f"margin{i}"))
            mask = ((s > t) | (t > 0)).float()
            total = total + ((s - t) ** 2 * mask).sum() / 2 ** (n - 1 - i)
        return F.cross_entropy(logits, y) + 1e-3 * total / x.shape[0]


def _sgd(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)


def _pair(method: str, teacher: str, student: str, device: torch.device, x: torch.Tensor):
    """``(distiller, reference)`` on the same student and teacher; the reference copies the connectors."""
    t, s = _models(teacher, student, device)
    if not (isinstance(t, WideResNet) and isinstance(s, WideResNet)):
        raise UserError(f"figure (b) compares with hand-written Wide ResNet forwards: --teacher and --student "
                        f"must be wrn-D-K models, not {teacher} and {student}")
    d = Distiller(s, t, LOSSES[method], input_shape=(3, 32, 32), log=lambda *_: None)
    d.setup(x)
    d.to(device).train()
    connectors = []
    if method == "margin_relu":
        term = d.terms[d.names.index("margin_relu")]
        connectors = [copy.deepcopy(a.project) for a in term.align]
    ref = Reference(method, s, t, connectors).to(device).train()
    return d, ref


def figure_b(*, teacher: str, student: str, reps: int, batch: int, device: torch.device,
             methods=("kd", "at", "margin_relu")) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=g).to(device)
    rows = []
    for method in methods:
        d, ref = _pair(method, teacher, student, device, x)
        loss_k = float(d(x, y)[0].detach())  # once, untimed, on the same weights
        loss_r = float(ref(x, y).detach())
        opt_k = _sgd(d.trainable_parameters())
        opt_r = _sgd([p for p in ref.parameters() if p.requires_grad])

        def step_kdgraph():
            loss = d(x, y)[0]
            opt_k.zero_grad(set_to_none=True)
            loss.backward()
            opt_k.step()

        def step_reference():
            loss = ref(x, y)
            opt_r.zero_grad(set_to_none=True)
            loss.backward()
            opt_r.step()

        r = interleaved(step_reference, step_kdgraph, reps, device)
        rows.append({"method": method, "loss": LOSSES[method], "teacher": teacher, "student": student,
                     "batch": batch, "reference_ms": 1e3 * r["a_s"], "kdgraph_ms": 1e3 * r["b_s"],
                     "ratio": r["ratio"], "loss_kdgraph": loss_k, "loss_reference": loss_r,
                     "loss_rel_diff": abs(loss_k - loss_r) / max(abs(loss_r), 1e-12),
                     "raw_s": {"reference": r["a_all_s"], "kdgraph": r["b_all_s"]}})
    return rows


# ------------------------------------------------------------------------------- (c) data pipelines
def synthetic_cifar(n: int, augment: bool = True, seed: int = 0):
    """A torchvision ``CIFAR10`` holding ``n`` random uint8 images (nothing read or downloaded)."""
    from torchvision import datasets
    from torchvision.datasets.vision import VisionDataset

    from ..data.vision import CIFAR_MEAN, CIFAR_STD, cifar_transform

    ds = datasets.CIFAR10.__new__(datasets.CIFAR10)
    VisionDataset.__init__(ds, "synthetic", transform=cifar_transform(augment, CIFAR_MEAN, CIFAR_STD))
    rng = np.random.default_rng(seed)
    ds.train = True
    ds.data = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    ds.targets = rng.integers(0, 10, n).tolist()
    return ds


def figure_c(*, reps: int, batch: int, device: torch.device, batches: int = 8) -> list[dict]:
    from torch.utils.data import DataLoader

    from ..data import EpochSampler
    from ..data.tensor import TensorLoader, tensor_source

    n = batch * batches
    ds = synthetic_cifar(n)
    source = tensor_source(ds, name="synthetic CIFAR-10")

    def per_sample_loader():
        return DataLoader(ds, batch_size=batch, sampler=EpochSampler(n, seed=0), num_workers=0)

    def run(loader):
        def go():
            loader.sampler.set_epoch(go.epoch)
            go.epoch += 1
            count = 0
            for x, _ in loader:
                count += len(x)
            assert count == n
            return x
        go.epoch = 0
        return go

    rows = []
    with threads(1):
        per_sample = run(per_sample_loader())
        tensor_cpu = run(TensorLoader(source, batch, EpochSampler(n, seed=0)))
        r = interleaved(per_sample, tensor_cpu, reps, torch.device("cpu"), warmup=1)
        rows.append({"pipeline": "tensor", "device": "cpu", "threads": 1, "batch": batch, "images": n,
                     "per_sample_img_s": n / r["a_s"], "tensor_img_s": n / r["b_s"],
                     "ratio": statistics.median(a / b for a, b in zip(r["a_all_s"], r["b_all_s"])),
                     "raw_s": {"per_sample": r["a_all_s"], "tensor": r["b_all_s"]}})
    if device.type == "cuda":
        tensor_gpu = run(TensorLoader(source, batch, EpochSampler(n, seed=0), device=device))
        per_sample = run(per_sample_loader())
        r = interleaved(per_sample, tensor_gpu, reps, device, warmup=1)
        rows.append({"pipeline": "tensor", "device": str(device), "threads": torch.get_num_threads(),
                     "batch": batch, "images": n, "per_sample_img_s": n / r["a_s"], "tensor_img_s": n / r["b_s"],
                     "ratio": statistics.median(a / b for a, b in zip(r["a_all_s"], r["b_all_s"])),
                     "raw_s": {"per_sample": r["a_all_s"], "tensor": r["b_all_s"]}})
    return rows


# ------------------------------------------------------------------------------------- (d) memory
def _resident_bytes(*objs) -> int:
    """Bytes of the distinct storages of every tensor in modules, optimisers and tensors given."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if torch.is_tensor(t):
            st = t.untyped_storage()
            if st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                total += st.nbytes()

    for o in objs:
        if isinstance(o, nn.Module):
            for t in list(o.parameters()) + list(o.buffers()):
                add(t)
                add(t.grad)
        elif isinstance(o, torch.optim.Optimizer):
            for state in o.state.values():
                for v in state.values():
                    add(v)
        else:
            add(o)
    return total


@contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (the profiler's C++ start/stop chatter and warnings) for the block."""
    import os

    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def peak_memory(step: Callable[[], object], device: torch.device, resident: Callable[[], int]) -> dict:
    """Peak bytes of tensors alive during ``step()``: what was held before plus the peak of the step's own."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"before_bytes": before, "step_peak_bytes": peak - before, "peak_bytes": peak,
                "method": "torch.cuda.max_memory_allocated"}
    from torch.profiler import ProfilerActivity, profile

    before = resident()
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    running = step_peak = 0
    for _, nbytes in events:
        running += nbytes
        step_peak = max(step_peak, running)
    return {"before_bytes": before, "step_peak_bytes": step_peak, "peak_bytes": before + step_peak,
            "method": "tensors held before the step + peak of torch.profiler(profile_memory) CPU allocations"}


def _step_memory(kind: str, teacher: str, student: str, x, y, device: torch.device, reps: int) -> dict:
    """Peak memory of a steady-state ``kind`` ("student": CE only, "kd") step: the largest of ``reps``."""
    t, s = _models(teacher, student, device)
    if kind == "student":
        d = Distiller(s, None, [{"method": "ce"}], input_shape=(3, 32, 32), log=lambda *_: None)
        held = (s,)
    else:
        d = Distiller(s, t, LOSSES["kd"], input_shape=(3, 32, 32), log=lambda *_: None)
        held = (s, t)
    d.setup(x)
    d.to(device).train()
    opt = _sgd(d.trainable_parameters())

    def step():
        loss = d(x, y)[0]
        loss.backward()
        opt.step()

    step()  # a steady-state step: the optimiser's state exists
    runs = []
    for _ in range(reps):
        # Gradients freed before the step (freeing blocks allocated before the profiler started is not
        # recorded on the CPU); the step allocates them anew, so they count in its peak.
        opt.zero_grad(set_to_none=True)
        runs.append(peak_memory(step, device, lambda: _resident_bytes(*held, d.terms, opt, x, y)))
    return max(runs, key=lambda r: r["peak_bytes"])


def figure_d(*, teacher: str, student: str, batch: int, device: torch.device, reps: int = 3) -> list[dict]:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=g).to(device)
    alone = _step_memory("student", teacher, student, x, y, device, reps)
    kd = _step_memory("kd", teacher, student, x, y, device, reps)
    return [{"teacher": teacher, "student": student, "batch": batch, "student_only": alone, "kd": kd,
             "ratio": kd["peak_bytes"] / alone["peak_bytes"],
             "step_ratio": kd["step_peak_bytes"] / max(1, alone["step_peak_bytes"])}]


# ------------------------------------------------------------------------------------------ report
def _verdict(fig: str, ratio: float) -> str:
    target = TARGETS[fig]
    if target is None:
        return "-"
    op, value = target
    return "pass" if (ratio <= value if op == "<=" else ratio >= value) else "FAIL"


def _target(fig: str) -> str:
    target = TARGETS[fig]
    return "-" if target is None else f"{target[0]} {target[1]:g}"


def table_rows(results: dict) -> list[tuple[str, str, str, str, str, str]]:
    rows = []
    for r in results.get("a", []):
        fresh = "eager_before_tap_ms" in r
        what = f"{r['model']} {r['mode']} fwd{' +autograd' if r['grad'] else ''}, {len(r['taps'])} taps, b{r['batch']}"
        values = f"eager {r['eager_ms']:.1f} ms, tapped {r['tapped_ms']:.1f} ms"
        if fresh:
            what = f"{what}, plain API in a fresh process"
            values = f"{values} (eager before tap {r['eager_before_tap_ms']:.1f} ms)"
        rows.append(("a", what, values, f"{r['ratio']:.3f}", _target("a"), _verdict("a", r["ratio"])))
    for r in results.get("b", []):
        rows.append(("b", f"{r['method']} step {r['teacher']}->{r['student']}, b{r['batch']} "
                          f"(loss rel diff {r['loss_rel_diff']:.1e})",
                     f"reference {r['reference_ms']:.1f} ms, kdgraph {r['kdgraph_ms']:.1f} ms", f"{r['ratio']:.3f}",
                     _target("b"), _verdict("b", r["ratio"])))
    for r in results.get("c", []):
        where = "1 thread" if r["device"] == "cpu" else r["device"]
        rows.append(("c", f"CIFAR pipeline, tensor on {where}, b{r['batch']}",
                     f"per-sample {r['per_sample_img_s']:,.0f} img/s, tensor {r['tensor_img_s']:,.0f} img/s",
                     f"{r['ratio']:.1f}", _target("c"), _verdict("c", r["ratio"])))
    for r in results.get("d", []):
        mib = 2**20
        rows.append(("d", f"peak memory kd vs student-only step, b{r['batch']}",
                     f"student {r['student_only']['peak_bytes'] / mib:.0f} MiB, kd {r['kd']['peak_bytes'] / mib:.0f} MiB",
                     f"{r['ratio']:.2f}", _target("d"), _verdict("d", r["ratio"])))
    return rows


def format_table(rows) -> str:
    head = ("fig", "what", "values (medians)", "ratio", "target", "result")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: " | ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
    return "\n".join([line(head), "-+-".join("-" * w for w in widths), *map(line, rows)])


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for ln in f:
                if ln.startswith("model name"):
                    return ln.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run(*, reps: int = 20, batch: int = 128, device: str = "auto", only: str = FIGURES, out: str | None = "bench.json",
        teacher: str = "wrn-28-4", student: str = "wrn-16-2", step_batch: int | None = None,
        data_batches: int = 8, echo: Callable[[str], None] = print) -> dict:
    """Run the figures in ``only``, print the table, write the JSON to ``out``; return the results."""
    bad = sorted(set(only) - set(FIGURES))
    if bad or not only:
        raise UserError(f"--only takes letters of {FIGURES!r}, got {only!r}")
    if reps < 1 or batch < 2:
        raise UserError("--reps must be at least 1 and --batch at least 2")
    dev = pick_device(device, option="--device", mps=False)
    if step_batch is None:
        step_batch = batch if dev.type == "cuda" else max(2, batch // 2)
    info = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "device": str(dev),
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name(),
            "cpu": _cpu_name(), "cpu_count": __import__("os").cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": __import__("torchvision").__version__, "threads": torch.get_num_threads(),
            "reps": reps, "batch": batch, "step_batch": step_batch, "teacher": teacher, "student": student,
            "targets": {k: (None if v is None else {"op": v[0], "value": v[1]}) for k, v in TARGETS.items()}}
    results: dict = {}
    started = time.perf_counter()
    for fig in FIGURES:
        if fig not in only:
            continue
        t0 = time.perf_counter()
        echo(f"bench: figure ({fig}) on {dev} ...")
        if fig == "a":
            results["a"] = figure_a(teacher=teacher, student=student, reps=reps, batch=batch, device=dev)
        elif fig == "b":
            results["b"] = figure_b(teacher=teacher, student=student, reps=reps, batch=step_batch, device=dev)
        elif fig == "c":
            results["c"] = figure_c(reps=reps, batch=batch, device=dev, batches=data_batches)
        else:
            results["d"] = figure_d(teacher=teacher, student=student, batch=step_batch, device=dev)
        info.setdefault("seconds", {})[fig] = round(time.perf_counter() - t0, 1)
    info["total_seconds"] = round(time.perf_counter() - started, 1)
    rows = table_rows(results)
    table = format_table(rows)
    echo(f"kdgraph bench: {info['device_name']} ({dev}), torch {torch.__version__}, threads {info['threads']}, "
         f"{reps} reps, {info['date']}")
    echo(table)
    doc = {**info, "table": table.splitlines(),
           "verdicts": {f"{r[0]}{i}": r[5] for i, r in enumerate(rows)}, "figures": results}
    if out:
        with open(out, "w") as f:
            json.dump(doc, f, indent=2)
        echo(f"wrote {out}")
    return doc


def cli(args) -> int:
    """``kdgraph bench``: the options of its parser (``kdgraph bench --help``) given in ``args``; those
    missing take :func:`run`'s defaults."""
    options = {k: v for k, v in vars(args).items() if k in _RUN_OPTIONS and v is not None}
    with threads(getattr(args, "threads", None)):
        run(**options)
    return 0


_RUN_OPTIONS = ("reps", "batch", "device", "only", "out", "teacher", "student", "step_batch", "data_batches")
