"""Pictures people look at: a ViT's class-token attention (DINO), PCA colours of patch features (DINOv2),
nearest-neighbour retrieval grids and a run's training curves; for a model of sounds the same drawn on log-mel
spectrograms, and DINO's views of a few clips (``show/sound.py``).

Every picture is a uint8 numpy array (H, W, 3), written with :func:`save_png`; the ``show_*`` functions take a
model from ``unsupdistill.models.load.load_model`` and images from :func:`load_pixels`.
"""

from unsupdistill.show.attention import (
    DINO_THRESHOLD,
    attention_picture,
    cls_attention,
    show_attention,
    threshold_attention,
)
from unsupdistill.show.canvas import PictureDoesNotFit, load_pixels, normalise, save_png, to_uint8
from unsupdistill.show.curves import plot_training_curves, read_metrics
from unsupdistill.show.pca import foreground_mask, pca_colours, pca_picture, show_pca, spatial_features
from unsupdistill.show.retrieval import Retrieval, image_features, nearest_neighbours, retrieval_grid, show_retrieval
from unsupdistill.show.sound import (
    VIEW_CLIPS,
    load_clips,
    run_multi_crop,
    show_sound_attention,
    show_sound_pca,
    show_sound_retrieval,
    show_sound_views,
    sound_retrieval_picture,
    spectrogram_rgb,
    whole_clips,
)

__all__ = ["DINO_THRESHOLD", "VIEW_CLIPS", "PictureDoesNotFit", "Retrieval", "attention_picture", "cls_attention",
           "foreground_mask", "image_features", "load_clips", "load_pixels", "nearest_neighbours", "normalise",
           "pca_colours", "pca_picture", "plot_training_curves", "read_metrics", "retrieval_grid", "run_multi_crop",
           "save_png", "show_attention", "show_pca", "show_retrieval", "show_sound_attention", "show_sound_pca",
           "show_sound_retrieval", "show_sound_views", "sound_retrieval_picture", "spatial_features",
           "spectrogram_rgb", "threshold_attention", "to_uint8", "whole_clips"]
