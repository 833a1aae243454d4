"""Pictures: class-token attention, PCA colours, retrieval grids and training curves, checked pixel by pixel."""

import json
import logging

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch import nn

from unsupdistill.methods.dino.method import DINO
from unsupdistill.models.frozen import FeatureModel, PixelFeatures
from unsupdistill.show import (
    attention_picture,
    cls_attention,
    foreground_mask,
    nearest_neighbours,
    pca_colours,
    plot_training_curves,
    read_metrics,
    save_png,
    show_attention,
    show_pca,
    show_retrieval,
    spatial_features,
    threshold_attention,
    to_uint8,
)
from unsupdistill.show.retrieval import QUERY_FRAME

TARGET = (1, 2)  # the patch (row, column) of the 4 x 4 grid the focused ViT's first head attends to


def tiny_vit(**kwargs) -> nn.Module:
    """A 2-block ViT on 32 x 32 images with 8 x 8 patches: a 4 x 4 grid, 2 heads of 16 dimensions."""
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                             num_classes=0, **kwargs).eval()


@torch.no_grad()
def focused_vit() -> nn.Module:
    """A ViT whose last block's first head sends the class token's attention to the one patch with red in it,
    and whose second head attends uniformly (zero query)."""
    model = tiny_vit()
    dim = model.embed_dim
    model.pos_embed.zero_()
    model.cls_token.zero_()
    conv = model.patch_embed.proj
    conv.weight.zero_()
    conv.bias.zero_()
    conv.weight[0, 0] = 1 / 64  # token dimension 0 = the patch's mean red; all others 0
    first = model.blocks[0]
    for layer in (first.attn.proj, first.mlp.fc2):  # block 0 adds nothing: the tokens reach block 1 unchanged
        layer.weight.zero_()
        layer.bias.zero_()
    last = model.blocks[-1]
    red = torch.zeros(1, 1, dim)
    red[..., 0] = 1
    key_of_red = last.norm1(red)[0, 0]  # (dim,) the red patch's attention input; all-zero tokens give 0
    qkv = last.attn.qkv
    qkv.weight.zero_()
    qkv.bias.zero_()
    qkv.weight[dim:2 * dim] = torch.eye(dim)  # keys = attention inputs
    qkv.bias[:16] = 2 * key_of_red[:16]  # head 0: every query, the class token's too, points at the red patch
    return model


def red_patch_image() -> torch.Tensor:
    x = torch.zeros(1, 3, 32, 32)
    x[0, 0, 8 * TARGET[0]:8 * TARGET[0] + 8, 8 * TARGET[1]:8 * TARGET[1] + 8] = 1
    return x


def test_attention_lights_the_patch_the_class_token_attends_to():
    attention = cls_attention(focused_vit(), red_patch_image())
    assert attention.shape == (1, 2, 4, 4)
    assert attention[0, 0, TARGET[0], TARGET[1]] > 0.9
    masks = threshold_attention(attention[0])  # (2, 4, 4)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[TARGET] = True
    assert torch.equal(masks[0], expected)
    # head 1 is uniform over 16 patches: the smallest set holding 60% of the mass is 10 patches (9/16 < 0.6)
    assert int(masks[1].sum()) == 10
    assert int(threshold_attention(attention[0, 1], threshold=1.0).sum()) == 16


def test_attention_overlay_tints_only_the_attended_square():
    attention = cls_attention(focused_vit(), red_patch_image())[0]  # (2, 4, 4)
    image = np.random.default_rng(0).integers(0, 200, size=(32, 32, 3), dtype=np.uint8)
    picture = attention_picture(image, attention, gap=2)
    assert picture.shape == (32, 3 * 32 + 2 * 2, 3)
    np.testing.assert_array_equal(picture[:, :32], image)
    head0 = picture[:, 34:66]
    inside = np.zeros((32, 32), dtype=bool)
    inside[8 * TARGET[0]:8 * TARGET[0] + 8, 8 * TARGET[1]:8 * TARGET[1] + 8] = True
    assert (head0[inside] != image[inside]).any(axis=-1).all()
    np.testing.assert_array_equal(head0[~inside], image[~inside])
    assert attention_picture(image, attention, mean_of_heads=True, gap=2).shape == (32, 2 * 32 + 2, 3)
    model = FeatureModel("vit", focused_vit(), 32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "key", "vit")
    red = red_patch_image()
    np.testing.assert_array_equal(show_attention(model, red), attention_picture(to_uint8(red)[0], attention))


def test_attention_weights_equal_timms_with_registers_and_qk_norm():
    model = tiny_vit(reg_tokens=2, qk_norm=True)
    assert model.num_prefix_tokens == 3
    attention = model.blocks[-1].attn
    with torch.no_grad():  # non-trivial q/k norms, so skipping them would show
        attention.q_norm.weight.uniform_(0.5, 2.0)
        attention.k_norm.bias.uniform_(-0.5, 0.5)
    attention.fused_attn = False  # timm then materialises the weights, passed through attn_drop
    seen = []
    handle = attention.attn_drop.register_forward_hook(lambda module, args, out: seen.append(out))
    ours = cls_attention(model, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    handle.remove()
    timms = seen[0]  # (B, heads, N, N)
    torch.testing.assert_close(timms.sum(dim=-1), torch.ones(timms.shape[:-1]))
    assert ours.shape == (2, 2, 4, 4)
    torch.testing.assert_close(ours.flatten(2), timms[:, :, 0, 3:])


class PatchCNN(nn.Module):
    """A one-layer CNN with timm's feature API whose cells see disjoint 8 x 8 patches (no overlap, no padding)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 16, 8, stride=8)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)  # (B, 16, h, w)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def test_attention_needs_a_vit_with_a_class_token():
    with pytest.raises(ValueError, match="VisionTransformer with a class token"):
        cls_attention(PatchCNN(), torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="VisionTransformer with a class token"):
        cls_attention(tiny_vit(class_token=False, global_pool="avg"), torch.zeros(1, 3, 32, 32))


def test_pca_splits_two_textures_through_a_cnn():
    # 64 x 64: three 8-pixel columns of cells with vertical stripes (the smaller part), five of a noisy colour
    x = torch.empty(1, 3, 64, 64)
    x[..., :24] = (torch.arange(24) % 2).float()
    x[..., 24:] = torch.tensor([0.2, 0.6, 0.9]).view(3, 1, 1) + 0.05 * torch.randn(3, 64, 40)
    model = FeatureModel("cnn", PatchCNN(), 64, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "key", "cnn")
    mask = foreground_mask(spatial_features(model.backbone, x))  # (1, 8, 8)
    assert mask[..., :3].all() and not mask[..., 3:].any()
    picture = show_pca(model, x.clamp(0, 1))
    assert picture.shape == (64, 2 * 64 + 2, 3)
    np.testing.assert_array_equal(picture[:, :64], (x.clamp(0, 1)[0].permute(1, 2, 0) * 255).round().byte())
    colours = picture[:, 66:]
    assert (colours[:, 24:] == 0).all()  # background black
    assert (colours[:, :24] == 128).all()  # identical foreground cells: no variance to colour, mid-grey


def made_up_features(sign: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch features (2, 6, 6, 8): background around one vector, a 2 x 3 foreground square in image 0 away
    along dimension 0 and varying along dimensions 1..3."""
    generator = torch.Generator().manual_seed(0)
    features = 0.01 * torch.randn(2, 6, 6, 8, generator=generator)
    square = torch.zeros(2, 6, 6, dtype=torch.bool)
    square[0, 1:3, 2:5] = True
    features[square, 0] += 5.0
    features[..., 1:4][square] += 0.5 * torch.randn(6, 3, generator=generator)
    return sign * features, square


@pytest.mark.parametrize("sign", [1.0, -1.0])  # the PCA's sign is arbitrary: one of the two needs the flip
def test_pca_foreground_is_the_smaller_side_coloured_by_a_second_pca(sign):
    features, square = made_up_features(sign)
    assert torch.equal(foreground_mask(features), square)
    assert torch.equal(foreground_mask(features, threshold=0.5), square)
    colours = pca_colours(features)  # (2, 6, 6, 3)
    assert colours.shape == (2, 6, 6, 3) and colours.dtype == np.uint8
    assert (colours[~square.numpy()] == 0).all()
    foreground = colours[square.numpy()]  # (6, 3): min-max scaled per component
    np.testing.assert_array_equal(foreground.min(axis=0), [0, 0, 0])
    np.testing.assert_array_equal(foreground.max(axis=0), [255, 255, 255])
    with pytest.raises(ValueError, match="threshold"):
        foreground_mask(features, threshold=1.5)


def test_retrieval_finds_the_query_first_and_draws_it_in_the_first_cell(tmp_path):
    rng = np.random.default_rng(0)
    files = []
    for number in range(6):
        path = tmp_path / f"image{number}.png"
        Image.fromarray(rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)).save(path)
        files.append(path)
    model = FeatureModel("pixels", PixelFeatures().eval(), 16, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "key", "pixels")
    result = show_retrieval(model, [files[3]], files, k=3, batch_size=4)
    assert result.indices.shape == (1, 3) and result.indices[0, 0] == 3
    assert result.scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    assert (result.scores[0, 1:] < 0.9).all() and (result.scores[0].diff() <= 0).all()
    picture = result.picture
    assert picture.shape == (20 + 12, 4 * 20 + 3 * 2, 3)  # cells of 16 + 2 * 2 pixels, captions of 12
    np.testing.assert_array_equal(picture[2:18, 2:18], np.asarray(Image.open(files[3])))
    assert (picture[0, :20] == QUERY_FRAME).all()
    for cell, index in enumerate(result.indices[0].tolist(), 1):  # then the neighbours, the query itself first
        left = cell * (20 + 2) + 2
        np.testing.assert_array_equal(picture[2:18, left:left + 16], np.asarray(Image.open(files[index])))


def test_nearest_neighbours_are_by_cosine_similarity():
    gallery = torch.tensor([[1.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    scores, indices = nearest_neighbours(torch.tensor([[0.0, 0.5], [2.0, 0.0]]), gallery, k=5)
    assert indices.tolist() == [[1, 2, 0], [0, 2, 1]]
    torch.testing.assert_close(scores[:, 1], torch.full((2,), 2 ** -0.5))


def metrics_lines() -> list[str]:
    rows = [{"step": step, "epoch": step / 5, "loss": 5.0 - 0.4 * step, "lr": 1e-3 * step / 5,
             "weight_decay": 0.04 + 0.002 * step ** 2, "teacher_momentum": 0.996 + 0.0005 * step, "teacher_temp": 0.04,
             "teacher_entropy": 4.0 - 0.3 * step, "teacher_kl_uniform": 0.3 * step + 1.545}
            for step in range(1, 6)]
    rows.append({"step": 5, "epoch": 1.0, "knn_top1": 42.0, "knn_k": 20})
    return [json.dumps(row) for row in rows] + ['{"step": 6, "epoch": 1.2, "loss": 2.']  # a killed writer


def test_training_curves_png_has_a_panel_per_series_and_skips_a_half_line(tmp_path, caplog):
    (tmp_path / "metrics.jsonl").write_text("\n".join(metrics_lines()))
    records, skipped = read_metrics(tmp_path / "metrics.jsonl")
    assert (len(records), skipped) == (6, 1)
    with caplog.at_level(logging.WARNING, logger="unsupdistill.show.curves"):
        out = plot_training_curves(tmp_path, tmp_path / "curves.png", DINO.curves)
    assert "skipped 1 line" in caplog.text
    pixels = np.asarray(Image.open(out).convert("RGB")).astype(np.int64)
    assert pixels.shape == (3 * 300, 2 * 500, 3)  # five panels: two columns, three rows of 500 x 300
    # without the method's own panels (teacher entropy and momentum), the shared three: loss, k-NN, lr
    out = plot_training_curves(tmp_path, tmp_path / "shared.png")
    assert np.asarray(Image.open(out)).shape[:2] == (2 * 300, 2 * 500)
    assert pixels.var() > 0
    line_blue = np.abs(pixels - np.array([31, 119, 180])).sum(axis=-1) < 30  # matplotlib's first line colour
    assert line_blue.sum() > 100


def test_training_curves_leave_out_missing_series(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps({"step": step, "loss": 1.0 / step}) for step in range(1, 4)) + "\n")
    out = plot_training_curves(path, tmp_path / "loss.png")
    pixels = np.asarray(Image.open(out).convert("RGB"))
    assert pixels.shape == (300, 500, 3) and pixels.var() > 0
    path.write_text(json.dumps({"step": 1, "images_per_s": 10.0}) + "\n")
    with pytest.raises(ValueError, match="holds none of the series"):
        plot_training_curves(path, tmp_path / "none.png")


def test_save_png_round_trips_pixels(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(Image.open(save_png(image, tmp_path / "a.png"))), image)
    with pytest.raises(ValueError, match=r"uint8 picture \(H, W, 3\)"):
        save_png(image.astype(np.float32), tmp_path / "b.png")


# ---------------------------------------------------------------- the command line


def test_show_command_draws_what_fits_and_every_run_ends_with_its_curves(tmp_path, tiny, capsys, caplog):
    """A CNN run: `unsupdistill pretrain` writes training_curves.png; `unsupdistill show` draws the PCA, retrieval and
    curves pictures, names the attention picture as not drawn, and fails with a clear message when asked for it."""
    from unsupdistill.cli import main

    run = tmp_path / "run"
    assert main(["pretrain", "--out", str(run), *tiny, "train.max_steps=3", "train.log_every_steps=1"]) == 0
    assert f"curves:      {run / 'training_curves.png'}" in capsys.readouterr().out
    assert np.asarray(Image.open(run / "training_curves.png")).std() > 0
    images = tmp_path / "images"
    images.mkdir()
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        Image.new("RGB", (16, 16), colour).save(images / f"{i}.png")
    out = tmp_path / "show"
    assert main(["show", str(run), str(images), "--gallery", str(images), "--out", str(out), "--k", "2"]) == 0
    printed = capsys.readouterr().out
    assert "not drawn: attention" in printed
    for kind in ("pca", "retrieval", "curves"):
        assert str(out / f"{kind}.png") in printed
    retrieval = np.asarray(Image.open(out / "retrieval.png"))
    assert (retrieval[4:10, 4:10] == (255, 0, 0)).all()  # the first query (red) heads the first row
    with caplog.at_level(logging.ERROR):
        assert main(["show", str(run), str(images), "--kind", "attention", "--out", str(out)]) == 2
    assert "show --kind attention" in caplog.text and "VisionTransformer" in caplog.text


def test_eval_writes_the_pictures_that_fit(tmp_path):
    """`unsupdistill eval` adds PCA colours for a CNN, attention too for a ViT, and for both the test images'
    nearest training images, the first row headed by the first test image."""
    from unsupdistill.data.labeled import load_labeled
    from unsupdistill.evaluate.run import EvalOptions, evaluate

    cnn = "timm:resnet18,small_image_stem=true,channels=[8,8,16,16],stem_width=8"
    vit = "timm:vit_tiny_patch16_224,img_size=16,patch_size=4,embed_dim=32,depth=2,num_heads=2"
    options = EvalOptions(image_size=16, linear=False, clustering=False, cache=False)
    for spec, kinds in ((cnn, {"pca", "retrieval"}), (vit, {"attention", "pca", "retrieval"})):
        out = tmp_path / spec[5:8]
        evaluate(spec, "digits", "digits", options, out)
        assert {p.stem for p in out.glob("*.png")} - {"feature_map", "knn_vs_k"} == kinds
        retrieval = np.asarray(Image.open(out / "retrieval.png"))
        first = load_labeled("digits", 16, "test")[0].permute(1, 2, 0).numpy()  # (16, 16, 3) uint8
        assert (retrieval[2:18, 2:18] == first).all()
