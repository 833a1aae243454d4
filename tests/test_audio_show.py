"""Pictures of a model of sounds: spectrograms (low frequencies at the bottom), DINO's views of a run's clips, the
nearest neighbours as spectrograms, and eval's pictures, on generated tones of three pitches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY, write_tones
from PIL import Image

from unsupdistill.cli import main
from unsupdistill.models.load import load_model
from unsupdistill.show import (
    PictureDoesNotFit,
    load_clips,
    run_multi_crop,
    save_png,
    show_sound_pca,
    show_sound_retrieval,
    spectrogram_rgb,
)
from unsupdistill.show.sound import SCALE, VIEW_CLIPS

SOUND = [item for item in TINY if not item.startswith("eval.summary")]
MAX_BYTES = 200_000


@pytest.fixture(scope="module")
def sounds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/ and test/ folders of class subfolders of tones of three pitches, 8 kHz WAV."""
    return write_tones(tmp_path_factory.mktemp("sounds"), {"train": 6, "test": 2}, 0.4)


@pytest.fixture(scope="module")
def run(sounds: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two DINO steps on the train folder, no recipe."""
    out = tmp_path_factory.mktemp("runs") / "sound"
    assert main(["pretrain", str(sounds / "train"), "--out", str(out), *SOUND, "train.batch_size=6",
                 "train.max_steps=2", "train.log_every_steps=1", "eval.summary=false"]) == 0
    return out


def _rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_a_spectrogram_is_drawn_with_its_low_bands_at_the_bottom() -> None:
    log_mel = torch.zeros(1, 8, 5)
    log_mel[0, 0] = 1.0  # the first (lowest) mel band loud, the rest silent
    picture = spectrogram_rgb(log_mel, low=0.0, high=1.0, scale=2)
    assert picture.shape == (16, 10, 3) and picture.dtype == np.uint8
    brightness = picture.astype(int).sum(axis=2)  # (16, 10)
    assert (brightness[-2:] > 600).all()  # magma's lightest yellow in the bottom two rows
    assert (brightness[:-2] < 60).all()  # its black above


def test_show_draws_a_sound_runs_views_neighbours_pca_and_curves(run: Path, sounds: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "show"
    assert main(["show", str(run), str(sounds / "test"), "--gallery", str(sounds / "train"), "--out", str(out),
                 "--k", "3"]) == 0
    printed = capsys.readouterr().out
    for kind in ("views", "retrieval", "curves"):
        assert str(out / f"{kind}.png") in printed
        assert 0 < (out / f"{kind}.png").stat().st_size < MAX_BYTES
    assert "not drawn: attention" in printed  # a ResNet of spectrograms has no class token
    assert "not drawn: pca" in printed and "too coarse" in printed  # nor a grid finer than 2 x 1 (stride 32)

    sidecar = json.loads((run / "backbone.json").read_text())
    rows, frames = 64 * SCALE, sidecar["input_size"] * SCALE  # audio.n_mels bands, the network's columns
    retrieval = _rgb(out / "retrieval.png")  # 6 test clips, each a row of itself and 3 neighbours, captioned
    assert retrieval.shape[1] == 4 * (frames + 4) + 3 * 2
    assert retrieval.shape[0] > 6 * (rows + 4)
    assert (retrieval[0, :frames + 4] == (0, 90, 200)).all()  # the first query's blue frame
    assert retrieval[2:rows + 2, 2:frames + 2].std() > 0  # a spectrogram inside it

    views = _rgb(out / "views.png")  # a row per clip: the whole clip, 2 global and TINY's 2 local views
    local_frames = yaml.safe_load((run / "config.yaml").read_text())["audio"]["local_frames"] * SCALE
    assert views.shape[1] == 3 * frames + 2 * local_frames + 4 * 4
    assert views.shape[0] > min(VIEW_CLIPS, 6) * rows
    assert views[:rows].std() > 0


def test_the_views_need_a_runs_config(run: Path) -> None:
    multi_crop = run_multi_crop(run)
    assert multi_crop.num_views == 4  # TINY: two global and two local views
    with pytest.raises(PictureDoesNotFit, match="config.yaml"):
        run_multi_crop(run / "backbone.safetensors")  # an export: the views it trained on are not in it


def test_the_neighbours_of_a_low_tone_are_low_tones(run: Path, sounds: Path) -> None:
    """Through features that tell the pitches apart (the log-mel statistics of the run's front end), each query's
    neighbours are of its pitch."""
    frontend = json.loads((run / "backbone.json").read_text())["frontend"]
    model = load_model("logmel", frontend=frontend)
    queries = sorted((sounds / "test").rglob("*.wav"))
    gallery = sorted((sounds / "train").rglob("*.wav"))
    found = show_sound_retrieval(model, queries, gallery, k=3, query_names=[q.parent.name for q in queries],
                                 gallery_names=[g.parent.name for g in gallery])
    for query, neighbours in zip(queries, found.indices.tolist()):
        assert {gallery[i].parent.name for i in neighbours} == {query.parent.name}
    assert found.picture.shape[1] == 4 * (model.input_size * 2 + 4) + 3 * 2  # a row: the query and 3 neighbours


def test_eval_of_a_sound_model_writes_the_pictures_that_fit(run: Path, sounds: Path, tmp_path: Path) -> None:
    from unsupdistill.evaluate.run import EvalOptions, evaluate

    out = tmp_path / "eval"
    evaluate(str(run), str(sounds / "train"), str(sounds / "test"),
             EvalOptions(linear=False, clustering=False, cache=False), out)
    assert {p.stem for p in out.glob("*.png")} == {"feature_map", "knn_vs_k", "retrieval"}  # no PCA: see below
    assert all(p.stat().st_size < MAX_BYTES for p in out.glob("*.png"))
    assert _rgb(out / "retrieval.png").std() > 0
    baseline = tmp_path / "logmel"  # log-mel statistics: no network; its neighbours still drawn
    evaluate("logmel", str(sounds / "train"), str(sounds / "test"),
             EvalOptions(linear=False, clustering=False, cache=False,
                         frontend=json.loads((run / "backbone.json").read_text())["frontend"]), baseline)
    assert {p.stem for p in baseline.glob("*.png")} == {"feature_map", "knn_vs_k", "retrieval"}


def test_a_palette_png_keeps_every_pixel_of_a_picture_of_few_colours(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (200, 3), dtype=np.uint8)
    picture = colours[rng.integers(0, 200, (30, 40))]  # (30, 40, 3) of 200 colours
    path = save_png(picture, tmp_path / "few.png", palette=True)
    assert Image.open(path).mode == "P"
    np.testing.assert_array_equal(_rgb(path), picture)


def test_pca_of_spectrograms_is_drawn_where_the_grid_is_fine_enough(run: Path, sounds: Path) -> None:
    """A stride-8 ResNet (small_image_stem) makes an 8 x 4 grid of 64 bands x 32 frames: one row per clip, the
    spectrogram beside its colours; the ImageNet stem's 2 x 1 grid is refused with the reason."""
    frontend = json.loads((run / "backbone.json").read_text())["frontend"]
    spec = "timm:resnet18,channels=[8,8,16,16],stem_width=8,in_chans=1"
    waves = load_clips(sorted((sounds / "test").rglob("*.wav"))[:3], load_model(spec, frontend=frontend))
    picture = show_sound_pca(load_model(spec + ",small_image_stem=true", frontend=frontend), waves)
    rows, columns = 64 * SCALE, frontend["frames"] * SCALE
    assert picture.shape == (3 * rows + 2 * 2, 2 * columns + 2, 3)
    with pytest.raises(PictureDoesNotFit, match="too coarse"):
        show_sound_pca(load_model(spec, frontend=frontend), waves)
