"""Distillation on a folder of sounds: the shared view of a clip, and how each kind of teacher sees it.

The student sees a view in time of the clip's log-mel (``audio.global_view``, ``model.input_size`` columns). A
teacher of sounds (a run, export or checkpoint of ours with a ``frontend``) sees the same view through its own
front end, which must compute the same mel power: the same rate, STFT and mel bands; only its normalisation and
columns may differ (:func:`teacher_frontend`). An image network (``timm:...,pretrained=true``, a run of images) sees
the view as a grey picture (:func:`~unsupdistill.augment.audio.to_image_teacher`). What works on images only, the
stored teacher maps and the teacher cache of stored views, is off for sounds (:data:`NO_MAPS`, :data:`NO_CACHE`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from unsupdistill.augment.audio import SHAPE_FIELDS, LogMel, sound_frontend
from unsupdistill.augment.distill import SoundDistillAugmentation
from unsupdistill.config import ConfigError

if TYPE_CHECKING:
    from unsupdistill.config import Config
    from unsupdistill.models.teachers import Teacher

NO_MAPS = ("sounds: the stored teacher maps pool an image's crop box, and a sound's view (a span resized in time, "
           "gain, mixing, masks) has no such box yet; the teacher sees every step's view")
"""Why ``distill.targets`` is ``views`` for sounds."""
NO_CACHE = "off for sounds: the teacher cache stores an image's view parameters, not a sound's yet"
"""Why the teacher cache is off for sounds."""
NORMALISATION = ("mean", "std")
"""Front-end fields a teacher of sounds may have of its own: its view is renormalised to them."""


def audio_fix(description: dict[str, Any], fields: list[str]) -> list[str]:
    """The ``audio.*`` settings that make the student's front end compute what ``description`` does in ``fields``."""
    rate = description["sample_rate"]
    window = ("window_ms", description["win_length"] * 1000 / rate)
    keys = {"sample_rate": ("sample_rate", rate), "win_length": window, "n_fft": window,
            "hop_length": ("hop_ms", description["hop_length"] * 1000 / rate),
            **{k: (k, description[k]) for k in ("n_mels", "f_min", "f_max")}}
    settings = dict(keys[f] for f in fields if f in keys)
    return [f"audio.{key}={value:g}" for key, value in settings.items()]


def teacher_frontend(student: LogMel, teacher: Teacher) -> LogMel:
    """The front end of a teacher of sounds, checked against the student's: the same mel power, so the student's
    view drawn through it is the teacher's view (in its own normalisation).

    Raises:
        ConfigError: the front ends differ in more than the normalisation; the message names the fields and the
            ``audio.*`` settings that match the teacher's.
    """
    description = {k: v for k, v in teacher.frontend.items() if k not in SHAPE_FIELDS}
    own = student.describe()
    differ = [k for k, v in description.items() if k not in NORMALISATION and own.get(k) != v]
    if differ:
        fix = audio_fix(description, differ)
        shown = ", ".join(f"{k} {own.get(k)} (the teacher's {description[k]})" for k in differ)
        raise ConfigError(f"the teacher {teacher.name} hears through another front end: the student's log-mel differs "
                          f"in {shown}. Distillation gives both networks the same view of each clip, so set "
                          + (" ".join(fix) + " (the teacher's)" if fix else "the student's audio section to the "
                             "teacher's front end") + ", or distill from a teacher of this front end")
    try:
        return LogMel.from_description(description)
    except ValueError as err:
        raise ConfigError(f"the teacher {teacher.name}'s front end cannot be rebuilt: {err}") from err


def sound_augmentation(config: Config, teacher: Teacher) -> SoundDistillAugmentation:
    """The shared view of a clip for the student (``model.input_size`` columns) and the teacher: a teacher of sounds
    at its columns through its front end, an image network at its side and normalisation."""
    frontend = sound_frontend(config.audio)
    view, frames = config.audio.global_view, config.model.input_size
    if teacher.frontend is not None:
        return SoundDistillAugmentation(frontend, view, frames, teacher.input_size, teacher_frontend(frontend, teacher))
    return SoundDistillAugmentation(frontend, view, frames, teacher.input_size, None, teacher.mean, teacher.std)
