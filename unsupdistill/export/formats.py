"""Export a trained backbone as safetensors (for plain timm), TorchScript or ONNX, checked for parity.

Every export is written to a temporary file, reloaded the way a user would load it (plain timm,
``torch.jit.load``, onnxruntime) and run on a batch of real images next to the PyTorch model. Only
if the features agree within the tolerance is the file renamed into place, so a failed export
leaves nothing behind.

A model of sounds (its sidecar has a ``frontend``) is exported with its front end: the TorchScript and ONNX graphs take
waves ``(N, 1, clip_samples)`` at the front end's rate (input ``waves``) and compute the log-mel inside
(:class:`~unsupdistill.models.frozen.SoundFeatures`: STFT, mel, log, normalisation, the resize in time to ``frames``
columns), and the parity check runs on real clips (:func:`~unsupdistill.export.parity.parity_clips`).

A model with a classifier (distilled with labels) keeps it, its class scores checked for parity too: the ONNX graph
has a second output ``logits`` after ``features``, the TorchScript module a ``logits`` method beside ``forward``
(which still returns the features), and a safetensors export a ``<stem>.classifier.safetensors`` file beside it; the
sidecar lists the ``classes`` in column order.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from unsupdistill import run_dir as layout
from unsupdistill.evaluate.features import NormalizedBackbone
from unsupdistill.export.names import ATOL, EXPORT_FORMATS, RTOL, ExportError
from unsupdistill.export.parity import parity_clips, parity_images
from unsupdistill.models.backbone import BACKBONE_FORMAT, BackboneSpec, rebuild_backbone
from unsupdistill.models.frozen import SoundFeatures
from unsupdistill.models.load import FeatureModel, load_model
from unsupdistill.storage import atomic_write, save_weights, write_json_atomic

logger = logging.getLogger(__name__)

SUFFIXES = {"safetensors": (".safetensors",), "torchscript": (".torchscript.pt", ".pt", ".ts"), "onnx": (".onnx",)}
"""The file endings each format's export may have; the first is the one a default export name gets."""
ONNX_OPSET = 18
"""The ONNX opset of exported graphs (torch.export-based exporter)."""
INPUT_NAME, OUTPUT_NAME = "images", "features"
SOUND_INPUT_NAME = "waves"
"""The input of a sound model's TorchScript and ONNX graphs: float32 waves (N, 1, clip_samples)."""
LOGITS_NAME = "logits"
"""A model with a classifier: the ONNX graph's second output and the TorchScript module's method, class scores
(N, C) whose column i is the sidecar's ``classes[i]`` (softmax gives the probabilities)."""


@dataclass
class Parity:
    """How closely an exported model reproduces the PyTorch model's features."""

    max_abs_error: float
    max_rel_error: float
    """max |exported - pytorch| / max |pytorch|."""
    tolerance: float
    """The max_abs_error allowed: atol + rtol * max |pytorch|."""
    batch_sizes: list[int]
    images: str
    """Where the real images (or sound clips: the sidecar names it ``clips``) came from."""

    @property
    def passed(self) -> bool:
        return self.max_abs_error <= self.tolerance


@dataclass
class ExportResult:
    path: Path
    sidecar: Path
    format: str
    parity: Parity
    """Of the features."""
    logits_parity: Parity | None = None
    """Of the class scores, for a model with a classifier; else None."""
    classifier: Path | None = None
    """A safetensors export's classifier file beside it (a model with a classifier); else None."""
    inputs: str = "images"
    """What the parity ran on: images, or clips (a model of sounds)."""


class ClassifyingBackbone(nn.Module):
    """An exported network with its classifier: ``forward`` gives the features (B, D) as every export's does,
    ``logits`` the class scores (B, C), both from the network's input (float RGB batches (B, 3, S, S) in [0, 1], or
    waves (B, 1, clip_samples) for a model of sounds)."""

    def __init__(self, network: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.network = network
        self.classifier = classifier

    def forward(self, x: Tensor) -> Tensor:
        return self.network(x)

    def logits(self, x: Tensor) -> Tensor:
        return self.classifier(self.network(x))


class _FeaturesAndLogits(nn.Module):
    """One ONNX graph with both outputs: features (B, D), then logits (B, C)."""

    def __init__(self, model: ClassifyingBackbone) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.model.network(x)
        return features, self.model.classifier(features)


def export_model(model: str, fmt: str, out: str | Path | None = None, *, out_dir: str | Path | None = None,
                 student: bool = False, data: str | None = None, atol: float = ATOL,
                 rtol: float = RTOL) -> ExportResult:
    """Export the teacher (or student) backbone of a run directory or checkpoint, and its classifier if it has one
    (the one that belongs to its weights, as :func:`~unsupdistill.models.load.load_model` gives it).

    Args:
        model: a run directory, a checkpoint (``.pt``) or an exported ``.safetensors`` backbone.
        fmt: one of :data:`EXPORT_FORMATS`.
        out: the file to write; by default ``<run>/export/<source>.<ext>`` (teacher, student, student_ema). A
            JSON sidecar with the same stem describes the input, the normalisation and the parity check.
        out_dir: instead of ``out``, the folder to write into, the file named as in ``<run>/export/``.
        student: export the student instead of the teacher.
        data: where the real parity images come from: an image folder or ``digits``; by default the
            run's training folder if it still exists, else the built-in digits. For a model of sounds, a sound
            folder; by default the run's training folder if it still exists, else generated clips
            (:data:`~unsupdistill.export.parity.GENERATED_CLIPS`).
        atol: absolute parity tolerance.
        rtol: tolerance relative to the largest feature magnitude.

    Raises:
        ExportError: bad format or path, a model that is not a trained one, or a failed parity check.
    """
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"export format '{fmt}' is unknown; allowed formats: {', '.join(EXPORT_FORMATS)}")
    if model == "pixels" or str(model).startswith("timm:"):
        raise ExportError(f"model '{model}' has no trained weights to export; give a run directory or a checkpoint")
    loaded = load_model(str(model), student=student)
    if loaded.description is None:
        raise ExportError(f"model '{model}' does not describe its backbone; give a run directory or a checkpoint")
    source = "student" if student else str(loaded.description.get("source", "teacher"))
    out_path = default_export_path(Path(model), fmt, source)  # named after the network it holds
    if out is not None:
        out_path = Path(out)
    elif out_dir is not None:
        out_path = Path(out_dir) / out_path.name
    if not out_path.name.lower().endswith(SUFFIXES[fmt]):
        raise ExportError(f"--out {out_path}: a {fmt} export must end in {' or '.join(SUFFIXES[fmt])}")
    if out_path.is_dir():
        raise ExportError(f"--out {out_path} is a directory; give a file name ending in {SUFFIXES[fmt][0]}")

    reference = feature_network(loaded.backbone, loaded)
    if loaded.classifier is not None:
        reference = ClassifyingBackbone(reference, loaded.classifier).eval()
    images, source = parity_clips(data, loaded) if loaded.frontend is not None else parity_images(data, loaded)
    with torch.no_grad():
        expected = (reference(images),)  # features (B, D)
        if loaded.classifier is not None:
            expected += (reference.logits(images),)  # (B, C)
    parity: list[Parity] = []

    def check(tmp: str, *classifier_tmp: str) -> None:
        parity[:] = measure_parity(_RUNNERS[fmt](tmp, loaded, *classifier_tmp), images, expected, atol, rtol, source)
        for name, result in zip((OUTPUT_NAME, LOGITS_NAME), parity):
            logger.info("%s parity of the %s on %d real %s from %s: max abs error %.3g, max rel error %.3g "
                        "(tolerance %.3g)", fmt, name, len(images), _noun(loaded), source, result.max_abs_error,
                        result.max_rel_error, result.tolerance)
            if not result.passed:
                raise ExportError(
                    f"the {fmt} export does not match the PyTorch model: max abs error of the {name} "
                    f"{result.max_abs_error:.3g} > tolerance {result.tolerance:.3g} (atol {atol} + rtol {rtol} x "
                    f"max |{name}|); nothing was written. Retry with another format, or loosen --atol/--rtol if the "
                    "difference is acceptable"
                )

    classifier = _WRITERS[fmt](out_path, loaded, reference, images, check)
    sidecar = sidecar_path(out_path)
    meta = export_description(loaded, fmt, parity, atol, rtol, classifier)
    write_json_atomic(meta, sidecar)
    return ExportResult(out_path, sidecar, fmt, parity[0], parity[1] if len(parity) > 1 else None, classifier,
                        _noun(loaded))


def feature_network(backbone: nn.Module, model: FeatureModel) -> nn.Module:
    """What an export holds, in eval mode: the backbone with its normalisation (:class:`NormalizedBackbone`, float RGB
    in [0, 1]) or, for a model of sounds, with its front end (:class:`SoundFeatures`, waves (B, 1, clip_samples))."""
    if model.frontend is not None:
        return SoundFeatures(backbone, model.frontend).eval()
    return NormalizedBackbone(backbone, model.mean, model.std).eval()


def _noun(model: FeatureModel) -> str:
    return "clips" if model.frontend is not None else "images"


def default_export_path(model: Path, fmt: str, source: str) -> Path:
    """``<run>/export/<source>.<ext>`` for a run directory or one of its checkpoints; ``source`` is the exported
    network: ``teacher`` (DINO), ``student`` or ``student_ema`` (distillation)."""
    ext = SUFFIXES[fmt][0]
    if model.is_dir():
        return model / layout.EXPORTS / f"{source}{ext}"
    run = layout.run_of(model) or model.parent  # a checkpoint outside a run: the export folder beside it
    return run / layout.EXPORTS / f"{model.stem}-{source}{ext}"


def sidecar_path(export: Path) -> Path:
    """``teacher.safetensors`` -> ``teacher.json`` (where evaluation looks for it); other formats append
    ``.json`` to the whole name (``teacher.onnx.json``), so exports of one model never share a sidecar."""
    if export.suffix.lower() == ".safetensors":
        return export.with_suffix(".json")
    return export.with_name(export.name + ".json")


def classifier_export_path(export: Path) -> Path:
    """``student.safetensors`` -> ``student.classifier.safetensors``: a safetensors export's classifier (with
    ``student.classifier.json``, its classes), beside it."""
    return export.with_name(export.name.removesuffix(export.suffix) + ".classifier.safetensors")


def export_description(model: FeatureModel, fmt: str, parity: list[Parity], atol: float, rtol: float,
                       classifier: Path | None = None) -> dict[str, Any]:
    """The JSON sidecar: the backbone's description plus what the exported file takes and returns, and the parity of
    each output (``parity``: the features; ``logits_parity``: the class scores of a model with a classifier, whose
    ``classes`` it lists and, for safetensors, whose ``classifier`` file it names)."""
    meta = dict(model.description or {})
    for key in ("classifier", "classes", "logits", "logits_parity"):  # an export's sidecar read back: set anew
        meta.pop(key, None)
    if fmt != "safetensors":
        meta.update({
            "format": f"unsupdistill.{fmt}/1",
            "input": f"float32 RGB batch (N, 3, {model.input_size}, {model.input_size}) with values in [0, 1], "
                     "any N; the mean/std normalisation is inside the graph",
            "input_name": INPUT_NAME, "output_name": OUTPUT_NAME,
            "output": f"features (N, {meta.get('feature_dim')})",
        })
        meta.pop("rebuild", None)
        if model.frontend is not None:  # the graph takes waves: the image preprocessing does not apply
            frontend = model.frontend
            meta.update({"input": f"float32 mono waves (N, 1, {frontend['clip_samples']}) at "
                                  f"{frontend['sample_rate']} Hz, any N: a file read mono (the mean of its channels), "
                                  "resampled to the rate, its centre cut out or zero-padded equally on both sides to "
                                  "clip_samples; the front end is inside the graph (STFT, mel, log, normalisation, "
                                  "the whole clip resized in time to frames columns, as 'frontend' describes)",
                         "input_name": SOUND_INPUT_NAME})
            for key in ("mean", "std", "resize"):
                meta.pop(key, None)
    if fmt == "onnx":
        meta["onnx_opset"] = ONNX_OPSET
    meta["parity"] = _parity_record(parity[0], atol, rtol, model)
    if model.classifier is not None:
        classes = list(model.classifier.classes)
        where = {"onnx": f"the second output, named {LOGITS_NAME!r} (output_names)",
                 "torchscript": f"the module's {LOGITS_NAME}(images) method (forward gives the features)",
                 "safetensors": "the classifier file's weight (C, D) and bias (C,): features @ weight.T + bias"}[fmt]
        meta.update({"classes": classes, "logits": f"class scores (N, {len(classes)}), column i for classes[i] "
                                                   f"(softmax gives the probabilities): {where}",
                     "logits_parity": _parity_record(parity[1], atol, rtol, model)})
        if fmt == "onnx":
            meta["output_names"] = [OUTPUT_NAME, LOGITS_NAME]
        if classifier is not None:
            meta["classifier"] = classifier.name
    return meta


def _parity_record(parity: Parity, atol: float, rtol: float, model: FeatureModel) -> dict[str, Any]:
    """A parity as the sidecar keeps it; a model of sounds names where its inputs came from ``clips``."""
    record = {**asdict(parity), "atol": atol, "rtol": rtol}
    if model.frontend is not None:
        record["clips"] = record.pop("images")
    return record


# ----------------------------------------------------------------------------------------------
# The parity check
# ----------------------------------------------------------------------------------------------


def measure_parity(run: Any, images: Tensor, expected: tuple[Tensor, ...], atol: float, rtol: float,
                   source: str) -> list[Parity]:
    """Run the exported model on the whole batch and on a single image or clip (the dynamic batch axis); one parity per
    output of ``expected``: the features (B, D), then the logits (B, C) of a model with a classifier. ``run`` returns
    the features, or (features, logits)."""
    errors: list[list[float]] = [[] for _ in expected]
    for batch in (images, images[:1]):
        outputs = run(batch)
        outputs = tuple(outputs) if isinstance(outputs, tuple | list) else (outputs,)
        if len(outputs) != len(expected):
            raise ExportError(f"the export returned {len(outputs)} outputs; the PyTorch model returns "
                              f"{len(expected)} ({', '.join((OUTPUT_NAME, LOGITS_NAME)[:len(expected)])})")
        for name, output, want, error in zip((OUTPUT_NAME, LOGITS_NAME), outputs, expected, errors):
            got, want = torch.as_tensor(np.asarray(output), dtype=torch.float32), want[: len(batch)]
            if got.shape != want.shape:
                raise ExportError(f"the export returned {name} of shape {tuple(got.shape)} for a batch of "
                                  f"{len(batch)}; the PyTorch model returns {tuple(want.shape)}")
            error.append((got - want).abs().max().item())
    parity = []
    for want, error in zip(expected, errors):
        scale, max_abs = want.abs().max().item(), max(error)
        parity.append(Parity(max_abs, max_abs / max(scale, 1e-12), atol + rtol * scale, [len(images), 1], source))
    return parity


# ----------------------------------------------------------------------------------------------
# Writers (to a temporary file) and runners (loading the file back the way a user would)
# ----------------------------------------------------------------------------------------------


def _write_safetensors(out: Path, model: FeatureModel, reference: nn.Module, images: Tensor,
                       check: Any) -> Path | None:
    """The backbone; with a classifier, its file beside it, written (inside the backbone's check) only once the pair
    passes parity, so a failed export writes neither. Returns the classifier's path, or None."""
    file_format = str((model.description or {}).get("format", BACKBONE_FORMAT))
    classifier = model.classifier
    if classifier is None:
        save_weights(model.backbone.state_dict(), out, file_format, check)
        return None
    path = classifier_export_path(out)

    def check_with_classifier(backbone_tmp: str) -> None:
        save_weights({"weight": classifier.weight, "bias": classifier.bias}, path, "pt",
                     lambda classifier_tmp: check(backbone_tmp, classifier_tmp))

    save_weights(model.backbone.state_dict(), out, file_format, check_with_classifier)
    sidecar = {"classes": list(classifier.classes), "feature_dim": int(classifier.in_features), "backbone": out.name}
    write_json_atomic(sidecar, path.with_suffix(".json"))
    return path


def _write_torchscript(out: Path, model: FeatureModel, reference: nn.Module, images: Tensor, check: Any) -> None:
    with warnings.catch_warnings():  # torch.jit is deprecated upstream but is what TorchScript users load
        warnings.simplefilter("ignore")
        if isinstance(reference, ClassifyingBackbone):  # forward: the features, as without a classifier
            traced = torch.jit.trace_module(reference, {"forward": images[:2], LOGITS_NAME: images[:2]},
                                            check_trace=False)
        else:
            traced = torch.jit.trace(reference, images[:2], check_trace=False)
        atomic_write(out, lambda tmp: torch.jit.save(traced, tmp), check)


def _write_onnx(out: Path, model: FeatureModel, reference: nn.Module, images: Tensor, check: Any) -> None:
    network, outputs = reference, [OUTPUT_NAME]
    if isinstance(reference, ClassifyingBackbone):
        network, outputs = _FeaturesAndLogits(reference).eval(), [OUTPUT_NAME, LOGITS_NAME]

    def write(tmp: str) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(  # opset 18 has STFT: a sound model's front end is in the graph
                network, (images[:2],), tmp, input_names=[_input_name(model)], output_names=outputs,
                opset_version=ONNX_OPSET, dynamo=True, external_data=False, verbose=False,
                dynamic_shapes=({0: torch.export.Dim("batch")},),  # (N, 3, S, S) or (N, 1, S) with any N
            )

    atomic_write(out, write, check)


def _run_safetensors(path: str, model: FeatureModel, classifier_path: str | None = None) -> Any:
    description = model.description or {}
    spec = BackboneSpec(description["timm_name"], dict(description.get("timm_kwargs") or {}),
                        bool(description.get("small_image_stem")))
    backbone = rebuild_backbone(spec)
    backbone.load_state_dict(load_file(path), strict=True)
    network = feature_network(backbone, model)  # a model of sounds: the sidecar's frontend before it
    if classifier_path is None:
        return torch.no_grad()(network)
    tensors = load_file(classifier_path)  # logits = features @ weight.T + bias, as a user computes them

    @torch.no_grad()
    def run(batch: Tensor) -> tuple[Tensor, Tensor]:
        features = network(batch)  # (B, D)
        return features, features @ tensors["weight"].T + tensors["bias"]  # (B, C)

    return run


def _run_torchscript(path: str, model: FeatureModel) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        network = torch.jit.load(path, map_location="cpu").eval()
    if model.classifier is None:
        return torch.no_grad()(network)
    return torch.no_grad()(lambda batch: (network(batch), getattr(network, LOGITS_NAME)(batch)))


def _run_onnx(path: str, model: FeatureModel) -> Any:
    import onnxruntime  # imported here: only ONNX exports need it

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = _input_name(model)
    if model.classifier is None:
        return lambda batch: session.run([OUTPUT_NAME], {name: batch.numpy()})[0]
    return lambda batch: tuple(session.run([OUTPUT_NAME, LOGITS_NAME], {name: batch.numpy()}))


def _input_name(model: FeatureModel) -> str:
    return SOUND_INPUT_NAME if model.frontend is not None else INPUT_NAME


_WRITERS = {"safetensors": _write_safetensors, "torchscript": _write_torchscript, "onnx": _write_onnx}
_RUNNERS = {"safetensors": _run_safetensors, "torchscript": _run_torchscript, "onnx": _run_onnx}
