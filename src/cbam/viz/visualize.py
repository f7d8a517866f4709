"""``cbam visualize``: pictures of what a trained CBAM network attends to, in the paper's figure form, and a score.

For each image, one PNG: the input; the spatial attention of each stage (the mean of the stage's CBAM spatial
gates, upsampled bilinearly to the image) over it; Grad-CAM of the last stage for the CBAM network and, with a
``compare`` run (typically the plain network of the same family), for that one beside it. Titles carry the true
class when known and each network's prediction with its confidence; the object's box is outlined where the data
set has one. ``channel_gates.png`` shows how selective the channel gates are per stage, and with ``score=True`` the
pointing game and the mass-in-box share (:mod:`cbam.viz.score`) are measured over many validation images.

Everything runs on the CPU in float32, on the weights as saved (a run trained with ``cbam.fuse`` saved the plain
layout, which is what is rebuilt here). Grad-CAM is ``pytorch_grad_cam``'s (the ``viz`` extra); its hooks are
removed and the gradients it leaves are cleared, so the networks come back unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch import nn
from torchvision.transforms import v2
from tqdm.auto import tqdm

from ..layers import CBAM
from ..models.features import features_only
from ..train.checkpoint import CheckpointError, atomic_write
from ..train.config import TrainConfig, check_output_path
from ..train.data import GENERATED, GENERATED_SIZES, DataInfo
from ..train.engine import build_model, datasets_for, load_run
from . import figures
from .recorder import Recording, record
from .score import TIE_RTOL, ScoreRow, box_fractions, mass_in_box, pointing_hits, score_rows_table, summarise, upsample

__all__ = ["IMAGE_SUFFIXES", "Stage", "attention_stages", "grad_cam", "gradcam_layer", "visualize"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
VIZ_EXTRA = "pip install 'cbam[viz]' (grad-cam, matplotlib)"


# ------------------------------------------------------------------------------------------ stages and layers
@dataclass(frozen=True)
class Stage:
    """Consecutive CBAM modules working at one spatial size: ``name`` (their common path prefix), ``paths``."""

    name: str
    paths: tuple[str, ...]


def _common_prefix(paths: Sequence[str]) -> str:
    parts = [p.split(".") for p in paths]
    common = []
    for pieces in zip(*parts, strict=False):
        if len(set(pieces)) != 1:
            break
        common.append(pieces[0])
    return ".".join(common)


def attention_stages(rec: Recording) -> list[Stage]:
    """Group a recording's modules into stages: consecutive modules whose spatial gates have the same size (modules
    without a spatial gate: the same first path component). Named by the modules' common path prefix."""
    groups: list[tuple[Any, list[str]]] = []
    for path in rec.paths:
        gate = rec.spatial.get(path)
        key = tuple(gate.shape[-2:]) if gate is not None else ("module", path.split(".")[0])
        if groups and groups[-1][0] == key:
            groups[-1][1].append(path)
        else:
            groups.append((key, [path]))
    stages, seen = [], set()
    for k, (_, paths) in enumerate(groups):
        name = _common_prefix(paths) or f"stage {k + 1}"
        name = name if name not in seen else f"{name} ({k + 1})"
        seen.add(name)
        stages.append(Stage(name, tuple(paths)))
    return stages


def _is_head(module: nn.Module) -> bool:
    heads = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.Flatten, nn.Dropout, nn.Identity,
             nn.Linear)
    return isinstance(module, heads)


def gradcam_layer(model: nn.Module, example: torch.Tensor) -> tuple[str, nn.Module]:
    """Grad-CAM's target: the module producing the last stage's map (as :func:`cbam.models.features_only` knows it
    for the package's networks), else the last top-level child that outputs a 4-D map before the pooling head."""
    try:
        info = features_only(model).feature_info
    except TypeError:
        info = None
    if info is not None:
        name = info.module_name(len(info) - 1)
        return name, model.get_submodule(name)
    seen: list[tuple[str, nn.Module]] = []

    def hook_for(name: str):
        def hook(module: nn.Module, _args: tuple, output: Any) -> None:
            if isinstance(output, torch.Tensor) and output.dim() == 4 and not _is_head(module):
                seen.append((name, module))

        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in model.named_children()]
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        for handle in handles:
            handle.remove()
    if not seen:
        raise ValueError(f"no layer for Grad-CAM in {type(model).__name__}: expected a child module that outputs "
                         "a 4-D feature map")
    return seen[-1]


# ------------------------------------------------------------------------------------------ runs
@dataclass
class _Model:
    label: str
    net: nn.Module
    path: Path
    cfg: TrainConfig
    layer_name: str = ""
    layer: nn.Module | None = None


def _require_viz() -> None:
    try:
        import matplotlib  # noqa: F401
        import pytorch_grad_cam  # noqa: F401
    except ImportError as exc:
        missing = exc.name or "grad-cam or matplotlib"
        raise ValueError(f"visualize needs the viz extra ({missing} is missing): {VIZ_EXTRA}") from None


def _build(cfg: TrainConfig, weights: dict[str, torch.Tensor], path: Path, data: DataInfo, label: str) -> _Model:
    net = build_model(cfg, data.num_classes, data.in_chans)
    try:
        net.load_state_dict(weights)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not fit {cfg.model} (attention {cfg.attention}) with "
                              f"{data.num_classes} classes and {data.in_chans} input channel(s): "
                              f"{str(exc).strip().splitlines()[0]}") from None
    return _Model(label, net.float().cpu().eval(), path, cfg)


def _data_config(cfg: TrainConfig, dataset: str | None, data_dir: str | Path | None, needed: int) -> TrainConfig:
    """The run's configuration pointed at the data to show: another data set or folder when given; synthetic data
    generated only as far as needed (sample i does not depend on the split's length)."""
    updates: dict[str, Any] = {}
    if dataset is not None and dataset.strip().lower().replace("_", "-") != cfg.dataset:
        updates.update(dataset=dataset, data_dir=None if data_dir is None else str(data_dir))
    elif data_dir is not None:
        updates["data_dir"] = str(data_dir)
    cfg = dataclasses.replace(cfg, **updates)
    if cfg.dataset in GENERATED:
        cfg = dataclasses.replace(cfg, synthetic_train_size=1, synthetic_val_size=max(1, min(cfg.synthetic_val_size,
                                                                                               needed)))
    return cfg


_GENERATED_KEYS = {"synthetic": ("synthetic_seed", "synthetic_classes"),
                   "cluttered-digits": ("synthetic_seed", "clutter")}


def _check_same_data(main: TrainConfig, other: TrainConfig, path: Path) -> None:
    """Both runs must have seen the same images: data set, image size (unset: the data set's), generator options."""

    def described(cfg: TrainConfig) -> dict[str, Any]:
        default = GENERATED_SIZES.get(cfg.dataset)
        keys = {"dataset": cfg.dataset, "image_size": cfg.image_size if cfg.image_size is not None else default}
        return keys | {k: getattr(cfg, k) for k in _GENERATED_KEYS.get(cfg.dataset, ())}

    ours, theirs = described(main), described(other)
    differ = [f"{k} {theirs[k]!r} (checkpoint: {ours.get(k)!r})" for k in theirs if ours.get(k) != theirs[k]]
    if differ:
        raise ValueError(f"compare run {path} was trained on other data: {', '.join(differ)}; compare runs of the "
                         "same data")


# ------------------------------------------------------------------------------------------ images
@dataclass
class _Images:
    """Normalised images (N x C x H x W), what is known about each, and where they come from."""

    x: torch.Tensor
    names: list[str]
    labels: list[int | None]
    boxes: torch.Tensor | None = None


def _image_files(folder: str | Path) -> list[Path]:
    """The image files directly in ``folder``, sorted by name; a missing folder or one without images: ValueError."""
    folder = Path(folder)
    if not folder.exists():
        raise ValueError(f"images: folder {folder} does not exist")
    if not folder.is_dir():
        raise ValueError(f"images: {folder} is a file, expected a folder of images")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"images: no image files ({', '.join(IMAGE_SUFFIXES)}) directly in {folder}")
    return files


def _folder_images(files: Sequence[Path], data: DataInfo) -> _Images:
    """The files as the run sees its images: grey or RGB as it takes them, resized (shorter side) and centre-cropped
    to its image size, normalised with its mean and std."""
    if data.in_chans not in (1, 3):
        raise ValueError(f"images: the run takes {data.in_chans}-channel images; image files give 1 or 3")
    transform = v2.Compose([v2.Resize(data.image_size), v2.CenterCrop(data.image_size), v2.ToImage(),
                            v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(data.mean), list(data.std)),
                            v2.ToPureTensor()])
    tensors = []
    for path in files:
        try:
            with Image.open(path) as image:
                image = image.convert("L" if data.in_chans == 1 else "RGB")
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
            raise ValueError(f"images: cannot read {path} ({type(exc).__name__})") from None
        tensors.append(transform(image))
    return _Images(torch.stack(tensors), [p.name for p in files], [None] * len(files))


def _dataset_images(val_set: Any, name: str, start: int, stop: int) -> _Images:
    items = [val_set[i] for i in range(start, stop)]
    x = torch.stack([torch.as_tensor(image, dtype=torch.float32) for image, _ in items])
    labels = [int(label) for _, label in items]
    boxes = getattr(val_set, "boxes", None)
    boxes = None if boxes is None else torch.as_tensor(boxes[start:stop], dtype=torch.float32)
    return _Images(x, [f"{name} val #{i}" for i in range(start, stop)], labels, boxes)


# ------------------------------------------------------------------------------------------ passes
def grad_cam(model: nn.Module, images: torch.Tensor, classes: Sequence[int] | torch.Tensor | None = None, *,
             layer: nn.Module | None = None) -> torch.Tensor:
    """Grad-CAM (N x H x W, each scaled to [0, 1] by pytorch_grad_cam) of ``classes`` (default: the predicted ones)
    at ``layer`` (default: :func:`gradcam_layer`'s). The model is put in eval mode; Grad-CAM's hooks and the
    gradients it leaves are removed, so the model is otherwise as it was."""
    _require_viz()
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if not isinstance(model, nn.Module):
        raise TypeError(f"grad_cam: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"grad_cam: expected images N x C x H x W, got {getattr(images, 'shape', type(images))}")
    layer = gradcam_layer(model, images)[1] if layer is None else layer
    if classes is None:
        with torch.no_grad():
            classes = model.eval()(images).argmax(1)
    classes = [int(c) for c in classes]
    if len(classes) != len(images):
        raise ValueError(f"grad_cam: expected one class per image ({len(images)}), got {len(classes)}")
    cam = GradCAM(model=model, target_layers=[layer])
    try:
        with torch.enable_grad():
            maps = cam(input_tensor=images, targets=[ClassifierOutputTarget(c) for c in classes])
    finally:
        cam.__exit__(None, None, None)  # removes its hooks, without swallowing an IndexError as its __exit__ would
        model.zero_grad(set_to_none=True)
    return torch.from_numpy(maps).float()


@dataclass
class _Pass:
    """One batch through both networks: class probabilities, gates (CBAM network), Grad-CAM maps."""

    probs: list[torch.Tensor]
    rec: Recording
    cams: list[torch.Tensor]


def _run(models: Sequence[_Model], x: torch.Tensor) -> _Pass:
    probs = []
    with torch.no_grad(), record(models[0].net) as rec:
        probs.append(models[0].net(x).float().softmax(1))
    with torch.no_grad():
        probs += [m.net(x).float().softmax(1) for m in models[1:]]
    cams = [grad_cam(m.net, x, p.argmax(1), layer=m.layer) for m, p in zip(models, probs, strict=True)]
    return _Pass(probs, rec, cams)


def _stage_maps(rec: Recording, stages: Sequence[Stage], size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Per stage with spatial gates: the mean of its modules' gates, upsampled to the image (N x H x W)."""
    out = {}
    for stage in stages:
        gates = [rec.spatial[p] for p in stage.paths if p in rec.spatial]
        if gates:
            out[stage.name] = upsample(torch.stack(gates).mean(0), size)
    return out


# ------------------------------------------------------------------------------------------ the entry point
def _check_count(what: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be an integer >= 1, got {value!r}")
    return value


def _span(values: torch.Tensor) -> str:
    """A map's range with as many decimals as tell its ends apart (gates of a young network differ by 1e-4)."""
    lo, hi = float(values.min()), float(values.max())
    digits = 2 if hi - lo >= 0.01 else min(6, 1 - math.floor(math.log10(hi - lo))) if hi > lo else 2
    return f"{lo:.{digits}f}-{hi:.{digits}f}"


def _class_name(data: DataInfo, k: int) -> str:
    return data.class_names[k] if 0 <= k < len(data.class_names) else f"class {k}"


def visualize(
    checkpoint: str | Path,
    *,
    output: str | Path,
    compare: str | Path | None = None,
    images: str | Path | None = None,
    dataset: str | None = None,
    data_dir: str | Path | None = None,
    num_images: int = 8,
    score: bool = False,
    score_images: int = 256,
    batch_size: int = 32,
    progress: bool = True,
) -> dict[str, Any]:
    """Draw what the CBAM network of ``checkpoint`` attends to, and with ``score`` measure it, into ``output``.

    ``checkpoint``: a run of ``cbam train`` (folder, ``.pt`` checkpoint or ``model.safetensors``) whose network holds
    CBAM modules; ``compare``: a second run of the same data (typically the plain network) whose Grad-CAM is shown
    beside. Images: ``images=DIR`` (the png/jpg/jpeg/bmp/webp files directly in DIR, sorted by name, resized and
    centre-cropped to the run's image size, normalised as in training; the run's data set is still read for its
    classes and normalisation, ``data_dir`` pointing at it), or ``dataset=NAME`` (with ``data_dir``): the first
    ``num_images`` validation images of that data set as the run's configuration builds it. With neither, the run's
    own data set; both is a ValueError.

    Writes ``image_000.png``, ... (one per image), ``channel_gates.png`` and with ``score`` ``score.json``: the
    pointing game and mass in box of each stage's spatial attention and of Grad-CAM over the first ``score_images``
    validation images (which needs a data set with object boxes). Returns ``{"output", "pictures", "channel_gates",
    "score_json", "score", "table", "files"}``: the paths written and, with ``score``, the rows (dicts) and the table
    as text. Bad input is a one-line ValueError or TypeError, checked before any work.
    """
    for what, value in (("num_images", num_images), ("score_images", score_images), ("batch_size", batch_size)):
        _check_count(what, value)
    if images is not None and dataset is not None:
        raise ValueError("visualize: pass images (a folder) or dataset (a name), not both")
    if score and images is not None:
        raise ValueError("score needs boxes around the objects, which a folder of images does not have; score a "
                         "data set with boxes (synthetic, cluttered-digits) instead")
    _require_viz()
    out = check_output_path(output, "output")
    files = None if images is None else _image_files(images)[:num_images]

    cfg, weights, path = load_run(checkpoint)
    needed = num_images if images is not None else max(num_images, score_images if score else 0)
    data_cfg = _data_config(cfg, None if images is not None else dataset, data_dir, needed)
    _, val_set, data = datasets_for(data_cfg)
    if score and getattr(val_set, "boxes", None) is None:
        raise ValueError(f"score needs boxes around the objects; data set {data_cfg.dataset} has none (synthetic "
                         "has them)")
    main = _build(cfg, weights, path, data, f"{cfg.model}/{cfg.attention}")
    if not any(isinstance(m, CBAM) for m in main.net.modules()):
        raise ValueError(f"checkpoint {path} ({cfg.model}, attention {cfg.attention}) has no CBAM module to "
                         "visualize; pass it as compare beside a CBAM run")
    models = [main]
    if compare is not None:
        other_cfg, other_weights, other_path = load_run(compare)
        _check_same_data(cfg, other_cfg, other_path)
        label = f"{other_cfg.model}/{other_cfg.attention}"
        models.append(_build(other_cfg, other_weights, other_path, data, label if label != main.label
                             else f"{label} (compare)"))

    if files is not None:
        shown = _folder_images(files, data)
    else:
        shown = _dataset_images(val_set, data_cfg.dataset, 0, min(num_images, len(val_set)))
    for m in models:
        m.layer_name, m.layer = gradcam_layer(m.net, shown.x)

    out.mkdir(parents=True, exist_ok=True)
    written = _pictures(models, shown, data, out, batch_size, progress)
    result: dict[str, Any] = {"output": str(out), "pictures": written[:-1], "channel_gates": written[-1],
                              "score_json": None, "score": None, "table": None, "files": list(written)}
    if score:
        rows = _score(models, val_set, data_cfg.dataset, data, min(score_images, len(val_set)), batch_size,
                      progress)
        record_json = {
            "checkpoint": str(main.path), "compare": None if compare is None else str(models[1].path),
            "dataset": data_cfg.dataset, "images": rows[0].images, "chance": rows[0].chance,
            "definition": {
                "pointing_game": f"% of images whose map maximum lies in the object's box (every pixel within "
                                 f"{TIE_RTOL:g} x the maximum of it must be inside: ties and flat maps are misses)",
                "mass_in_box": "% of the map's sum inside the box, averaged over images; a spatial-gate map is taken "
                               "above its own minimum (Grad-CAM maps come min-max scaled), so the rows compare",
                "chance": "mean % of the image inside the box: a uniform map's mass in box and a uniformly "
                          "random point's hit rate",
                "maps": "upsampled bilinearly (align_corners=False) to the image; boxes x0, y0, x1, y1 in pixels, "
                        "x1/y1 exclusive",
            },
            "rows": [r.as_dict() for r in rows],
        }
        text = json.dumps(record_json, indent=2) + "\n"
        score_path = atomic_write(out / "score.json", lambda tmp: Path(tmp).write_text(text))
        result.update(score_json=str(score_path), score=[r.as_dict() for r in rows], table=score_rows_table(rows))
        result["files"].append(str(score_path))
    return result


def _pictures(models: Sequence[_Model], shown: _Images, data: DataInfo, out: Path, batch_size: int,
              progress: bool) -> list[str]:
    """One PNG per image, then channel_gates.png; returns their paths in that order."""
    size = tuple(shown.x.shape[-2:])
    written: list[str] = []
    channel: dict[str, list[torch.Tensor]] = {}
    stages: list[Stage] = []
    bar = tqdm(total=len(shown.x), desc="pictures", unit="image", disable=not progress)
    try:
        for start in range(0, len(shown.x), batch_size):
            x = shown.x[start:start + batch_size]
            run = _run(models, x)
            stages = stages or attention_stages(run.rec)
            for path in run.rec.paths:
                channel.setdefault(path, []).append(run.rec.channel[path])
            maps = _stage_maps(run.rec, stages, size)
            for j in range(len(x)):
                i = start + j
                label = shown.labels[i]
                truth = "" if label is None else f"true: {_class_name(data, label)}"
                panels = [figures.Panel("input" + (f"\n{truth}" if truth else ""))]
                for name, m in maps.items():
                    heat = m[j]
                    panels.append(figures.Panel(f"spatial {name}\ngate {_span(heat)}", heat.numpy()))
                for model, probs, cams in zip(models, run.probs, run.cams, strict=True):
                    k = int(probs[j].argmax())
                    panels.append(figures.Panel(f"Grad-CAM {model.label}\n{model.layer_name}, pred "
                                                f"{_class_name(data, k)} ({probs[j, k]:.0%})", cams[j].numpy()))
                image = figures.to_display(x[j], data.mean, data.std)
                box = None if shown.boxes is None else shown.boxes[i].tolist()
                fig = figures.image_figure(image, panels, title=f"{shown.names[i]}  {truth}".strip(), box=box)
                written.append(str(figures.save_png(fig, out / f"image_{i:03d}.png")))
                bar.update(1)
    finally:
        bar.close()
    per_stage = [(s.name, [(p, torch.cat(channel[p])) for p in s.paths]) for s in stages]
    fig = figures.channel_figure(per_stage, len(shown.x))
    written.append(str(figures.save_png(fig, out / "channel_gates.png")))
    return written


def _score(models: Sequence[_Model], val_set: Any, name: str, data: DataInfo, count: int, batch_size: int,
           progress: bool) -> list[ScoreRow]:
    """Pointing game and mass in box over the first ``count`` validation images, in batches, without figures."""
    sums: dict[tuple[str, str], list[list[torch.Tensor]]] = {}
    chance: list[torch.Tensor] = []
    bar = tqdm(total=count, desc="score", unit="image", disable=not progress)
    try:
        for start in range(0, count, batch_size):
            batch = _dataset_images(val_set, name, start, min(count, start + batch_size))
            assert batch.boxes is not None  # checked before any work
            size = tuple(batch.x.shape[-2:])
            run = _run(models, batch.x)
            maps = {(f"spatial {k}", models[0].label): v
                    for k, v in _stage_maps(run.rec, attention_stages(run.rec), size).items()}
            for model, cams in zip(models, run.cams, strict=True):
                maps[(f"grad-cam {model.layer_name}", model.label)] = upsample(cams, size)
            for key, m in maps.items():
                # Grad-CAM comes min-max scaled from pytorch_grad_cam; a gate map has a floor (sigmoids near 1/2),
                # so its mass is measured above its own minimum, as Grad-CAM's is, or the two would not compare
                floor = m.amin(dim=(-2, -1), keepdim=True) if key[0].startswith("spatial") else 0.0
                hits, mass = pointing_hits(m, batch.boxes), mass_in_box(m - floor, batch.boxes)
                sums.setdefault(key, [[], []])
                sums[key][0].append(hits)
                sums[key][1].append(mass)
            chance.append(box_fractions(batch.boxes, *size))
            bar.update(len(batch.x))
    finally:
        bar.close()
    every = torch.cat(chance)
    return [summarise(k[0], k[1], torch.cat(v[0]), torch.cat(v[1]), every) for k, v in sums.items()]
