"""The emoji judge: finding pictures in an image, naming them with a network trained on renders,
reading their cells and sizes, and saving the judge. A tiny catalogue of drawn pictures stands in
for the real one (no network, no data folder outside tmp_path)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from emoji_catalogues import write_catalogue
from PIL import Image, ImageDraw

from diffuse.emoji import judge as judge_module
from diffuse.emoji.judge import CLASSES_FILE, WEIGHTS_FILE, EmojiJudge, background, label, relation, train_judge
from diffuse.emoji.judge_train import CROP_SIZE, JudgeNet, PictureBank, TrainSettings, measure, training_crops
from diffuse.emoji.scenes import Picture, PictureCache, Scene, render

SHAPES = {
    "red apple": ("Food & Drink", "disc", (220, 30, 30)),
    "blue box": ("Objects", "square", (30, 60, 220)),
    "green tree": ("Animals & Nature", "triangle", (20, 160, 40)),
    "yellow cross": ("Travel & Places", "cross", (240, 200, 0)),
    "purple ring": ("Objects", "ring", (140, 40, 180)),
    "orange bar": ("Symbols", "bar", (250, 130, 0)),
}


def _draw(kind: str, colour: tuple[int, int, int]) -> Image.Image:
    image = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    fill = (*colour, 255)
    if kind == "disc":
        draw.ellipse((2, 2, 61, 61), fill=fill)
    elif kind == "square":
        draw.rectangle((4, 4, 59, 59), fill=fill)
    elif kind == "triangle":
        draw.polygon([(32, 2), (61, 61), (2, 61)], fill=fill)
    elif kind == "cross":
        draw.rectangle((24, 2, 39, 61), fill=fill)
        draw.rectangle((2, 24, 61, 39), fill=fill)
    elif kind == "ring":
        draw.ellipse((2, 2, 61, 61), fill=fill)
        draw.ellipse((18, 18, 45, 45), fill=(0, 0, 0, 0))
    else:  # a bar, drawn off the square's centre: its bounds are not the box's
        draw.rectangle((6, 30, 61, 58), fill=fill)
    return image


def make_catalogue(folder: Path) -> Path:
    pictures = {name: (category, _draw(kind, colour)) for name, (category, kind, colour) in SHAPES.items()}
    return write_catalogue(folder, pictures)


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory) -> Path:
    return make_catalogue(tmp_path_factory.mktemp("emoji"))


@pytest.fixture(scope="module")
def trained(catalogue, tmp_path_factory) -> tuple[EmojiJudge, Path]:
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("judge")
    settings = TrainSettings(steps=120, batch=32, learning_rate=3e-3, seed=0, widths=(16, 32, 32, 64))
    return train_judge(catalogue, out, settings, log_every=0), out


def test_a_short_training_leg_names_the_pictures_of_clean_and_degraded_renders(trained, catalogue):
    judge, _ = trained
    results = measure(judge, catalogue, image_size=64, seed=1)
    assert results["scenes"] == 2 * len(SHAPES)
    for kind in ("clean", "degraded"):
        rates = results[kind]
        assert rates["all"]["top1"] >= 0.9, (kind, rates)
        assert rates["all"]["position"] == 1.0, (kind, rates)
        assert rates["all"]["size"] >= (1.0 if kind == "clean" else 0.9), (kind, rates)  # blur widens a blob
        assert rates["evaluated"]["n"] == 2 * 5  # the "Symbols" picture is not evaluated


@pytest.mark.parametrize(
    ("a", "b", "rel", "positions", "sizes"),
    [
        ("red apple", "blue box", "left of", ("left", "right"), ("large", "small")),
        ("orange bar", "green tree", "above", ("top", "bottom"), ("small", "large")),
        ("purple ring", "yellow cross", "below", ("bottom right", "top right"), ("large", "large")),
    ],
)
def test_reading_places_sizes_and_relates_two_pictures(trained, catalogue, a, b, rel, positions, sizes):
    judge, _ = trained
    from diffuse.emoji.scenes import cell_centre

    objects = tuple(Picture(n, s, p, cell_centre(p)) for n, s, p in zip((a, b), sizes, positions))
    for background_name in ("white", "blue gradient", "black"):
        image = render(Scene(objects, background_name, (0, rel, 1)), 96, PictureCache(catalogue))
        readings = judge.read(image)
        assert sorted(r.name for r in readings) == sorted((a, b)), background_name
        assert readings[0].probability >= readings[1].probability
        found = {r.name: r for r in readings}
        for obj in objects:
            assert (found[obj.name].position, found[obj.name].size) == (obj.position, obj.size), (background_name, obj)
            assert np.allclose(found[obj.name].centre, obj.centre, atol=0.03)
        assert relation(found[a], found[b]) == rel


def test_an_empty_image_reads_as_nothing_and_a_plain_one_too(trained):
    judge, _ = trained
    assert judge.read(Image.new("RGB", (64, 64), (128, 128, 128))) == []
    speck = Image.new("RGB", (64, 64), (250, 250, 250))
    speck.putpixel((30, 30), (0, 0, 0))  # one dark pixel is noise, not a picture
    assert judge.read(speck) == []


def test_the_background_is_fitted_from_the_border_even_where_a_picture_touches_it():
    rows = np.linspace(0, 1, 48)[:, None]
    gradient = np.array([60, 110, 200]) * (1 - rows) + np.array([185, 215, 245]) * rows  # [48, 3]
    pixels = np.broadcast_to(gradient[:, None, :], (48, 48, 3)).round().astype(np.uint8).copy()
    pixels[10:20, 0:12] = (250, 0, 0)  # a picture reaching the left border
    assert np.abs(background(pixels) - gradient).max() < 2.0


def test_the_own_labelling_finds_the_same_components_as_scipy(monkeypatch):
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(0)
    for density in (0.2, 0.45, 0.6):
        mask = rng.random((40, 50)) < density
        ours, count = judge_module._label_by_search(mask)
        theirs, expected = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
        assert count == expected
        pairs = set(zip(ours[mask].tolist(), theirs[mask].tolist()))
        assert len(pairs) == count  # the same partition, numbered perhaps otherwise
    monkeypatch.setitem(__import__("sys").modules, "scipy", None)  # as where scipy is not installed
    labels, count = label(np.eye(5, dtype=bool) | np.eye(5, dtype=bool)[::-1])
    assert count == 1 and labels[2, 2] == 1


def test_save_and_load_round_trip_and_a_mismatched_name_list_is_refused(trained, tmp_path):
    judge, out = trained
    assert (out / WEIGHTS_FILE).is_file() and (out / CLASSES_FILE).is_file()
    loaded = EmojiJudge.load(out, names=list(SHAPES))
    crops = torch.rand(4, 3, CROP_SIZE, CROP_SIZE) * 2 - 1
    assert torch.equal(loaded.classify(crops), judge.classify(crops))
    assert loaded.bounds == judge.bounds and loaded.names == judge.names
    with pytest.raises(ValueError, match="trained on another name list") as error:
        EmojiJudge.load(out, names=list(reversed(SHAPES)))
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="trained on 6 names, not these 5"):
        EmojiJudge.load(out, names=list(SHAPES)[:5])


def test_weights_that_do_not_fit_the_class_list_are_refused(trained, tmp_path):
    judge, out = trained
    other = EmojiJudge(judge.names[:5], judge.bounds[:5], JudgeNet(5, (16, 32, 32, 64)))
    other.save(tmp_path)
    (tmp_path / CLASSES_FILE).write_text((out / CLASSES_FILE).read_text(encoding="utf-8"), encoding="utf-8")
    with pytest.raises(ValueError, match="weights do not fit"):
        EmojiJudge.load(tmp_path)
    with pytest.raises(ValueError, match="no judge here"):
        EmojiJudge.load(tmp_path / "elsewhere")
    (tmp_path / CLASSES_FILE).write_text('{"names": ["a"], "bounds": []}', encoding="utf-8")
    with pytest.raises(ValueError, match="not a judge's class list"):
        EmojiJudge.load(tmp_path)


def test_bad_images_are_refused_in_one_line_before_reading(trained):
    judge, _ = trained
    with pytest.raises(ValueError, match="from 8 to 1024 px"):
        judge.read(Image.new("RGB", (4000, 20)))
    with pytest.raises(ValueError, match="reads a PIL image"):
        judge.read(np.zeros((64, 64, 3), dtype=np.uint8))


def test_training_crops_and_settings(catalogue):
    bank = PictureBank(catalogue)
    assert bank.names == list(SHAPES)
    assert bank.bounds[list(SHAPES).index("orange bar")] == (6 / 64, 30 / 64, 62 / 64, 59 / 64)
    rng = torch.Generator().manual_seed(0)
    crops = training_crops(bank, torch.tensor([0, 1, 2, 3, 4, 5, 0, 1]), rng)
    assert crops.shape == (8, 3, CROP_SIZE, CROP_SIZE) and crops.min() >= -1 and crops.max() <= 1
    again = training_crops(bank, torch.tensor([0, 1, 2, 3, 4, 5, 0, 1]), torch.Generator().manual_seed(0))
    assert torch.equal(crops, again)  # a seed gives the same crops
    with pytest.raises(ValueError, match="either steps or minutes"):
        TrainSettings()
    with pytest.raises(ValueError, match="either steps or minutes"):
        TrainSettings(steps=5, minutes=1.0)
    with pytest.raises(ValueError, match="batch must be"):
        TrainSettings(steps=5, batch=1)


def test_the_command_line_trains_saves_and_reports(catalogue, tmp_path, capsys):
    out = tmp_path / "judge"
    assert (
        judge_module.main(["train", "--data", str(catalogue), "--out", str(out), "--steps", "2", "--batch", "8"]) == 0
    )
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["names"] == len(SHAPES) and set(report) >= {"clean", "degraded"}
    assert "trained in" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        judge_module.main(["train", "--data", str(tmp_path / "none"), "--out", str(out), "--steps", "2"])
    assert "no emoji catalogue here" in capsys.readouterr().err


def test_the_evaluation_scores_the_judges_readings(trained, catalogue):
    from diffuse.emoji.evaluate import as_reading, score_pair
    from diffuse.emoji.scenes import cell_centre

    judge, _ = trained
    objects = (
        Picture("green tree", "large", "left", cell_centre("left")),
        Picture("blue box", "small", "right", (0.8, 0.5)),
    )
    scene = Scene(objects, "beige", (0, "left of", 1))
    readings = judge.read(render(scene, 64, PictureCache(catalogue)))
    assert {as_reading(r).name for r in readings} == {"green tree", "blue box"}
    assert score_pair(scene, readings) == {"found": True, "relation": True}


def test_parts_drawn_apart_join_into_one_picture_and_pictures_stay_apart():
    from diffuse.emoji.judge import find_blobs

    pixels = np.full((128, 128, 3), 250, dtype=np.uint8)
    pixels[20:40, 10:25] = (200, 0, 0)  # two parts of one picture, 3 px apart (paw prints)
    pixels[20:40, 28:45] = (200, 0, 0)
    pixels[20:50, 52:80] = (0, 0, 200)  # another picture, 7 px (0.055 of the side) beyond them
    pixels[100, 100] = (0, 0, 0)  # a speck of noise
    blobs = find_blobs(pixels)
    assert [(b.left, b.top, b.right, b.bottom) for b in blobs] == [(52, 20, 80, 50), (10, 20, 45, 40)]


def test_training_goes_on_from_a_saved_judge_of_the_same_names_only(trained, catalogue, tmp_path):
    judge, out = trained
    settings = TrainSettings(steps=1, batch=8, learning_rate=1e-9, widths=(16, 32, 32, 64), degrade=2.0)
    again = train_judge(catalogue, tmp_path / "more", settings, start=out, log_every=0)
    assert torch.allclose(again.net.classify.weight, judge.net.classify.weight, atol=1e-6)
    assert (tmp_path / "more" / WEIGHTS_FILE).is_file()
    fewer = make_catalogue(tmp_path / "fewer")
    records = json.loads((fewer / "catalogue.json").read_text(encoding="utf-8"))
    (fewer / "catalogue.json").write_text(json.dumps(records[:5]), encoding="utf-8")
    with pytest.raises(ValueError, match="trained on 6 names, not these 5"):
        train_judge(fewer, tmp_path / "other", settings, start=out, log_every=0)


def test_degrade_scales_how_many_crops_are_worn(catalogue):
    bank = PictureBank(catalogue)
    classes = torch.arange(6).repeat(8)

    def crops(degrade: float) -> torch.Tensor:
        return training_crops(bank, classes, torch.Generator().manual_seed(3), degrade)

    clean, usual, most = crops(0.0), crops(1.0), crops(4.0)
    changed = [int(((c - clean).abs().amax(dim=(1, 2, 3)) > 1e-6).sum()) for c in (usual, most)]
    assert 0 < changed[0] < changed[1] == len(classes)  # at 4x every share reaches all crops
    with pytest.raises(ValueError, match="degrade must be"):
        TrainSettings(steps=1, degrade=5.0)
    with pytest.raises(ValueError, match="learning_rate must be"):
        TrainSettings(steps=1, learning_rate=0.0)
