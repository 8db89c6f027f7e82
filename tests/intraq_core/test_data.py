"""Test sets: validation in one place, class lists, the official validation layout, preprocessing, workers."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from intraq_core.classes import load_class_list
from intraq_core.config import IMAGENET_MEAN, IMAGENET_STD, EvalConfig, ModelConfig
from intraq_core.data import DatasetError, load_test_set, validate_labels
from intraq_core.evaluate import top1
from intraq_core.models import create_model, resolve_model_config

TEACHER = ModelConfig(arch="cifar_resnet20", weights="cifar10-resnet20")
# A spec that loading a test set needs (no model is built): 1000 ImageNet classes at 8x8, no resize.
TINY_IMAGENET_SPEC = ModelConfig(
    arch="cifar_resnet20", num_classes=1000, image_size=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)
)
# Positions in the standard ImageNet-1k order (sorted wnids): tench 0, goldfish 1, great white shark 2.
TENCH, GOLDFISH, SHARK = "n01440764", "n01443537", "n01484850"


def _png(path: Path, seed: int, size: tuple[int, int] = (8, 8)) -> np.ndarray:
    """A random RGB image (H×W = size) saved losslessly at ``path``; returns its pixels."""
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return pixels


def _normalized(pixels: np.ndarray, spec: ModelConfig) -> torch.Tensor:
    x = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255.0
    return (x - torch.tensor(spec.mean).view(3, 1, 1)) / torch.tensor(spec.std).view(3, 1, 1)


def _all(ts, batch_size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*ts.batches(batch_size), strict=True)
    return torch.cat(xs), torch.cat(ys)


# --------------------------------------------------------------------------- labels


def test_labels_of_shape_n_by_1_give_the_right_accuracy(cifar10_test_path: Path, tmp_path: Path) -> None:
    """The bug: labels saved as (N, 1) broadcast against (N,) predictions and printed 'top-1 994.00%'."""
    with np.load(cifar10_test_path) as d:
        images, labels = d["images"][:100], d["labels"][:100].astype(np.int64)
    np.savez(tmp_path / "n1.npz", images=images, labels=labels[:, None])
    model_cfg = resolve_model_config(TEACHER)
    model = create_model(model_cfg)
    with pytest.warns(UserWarning, match=r"labels of shape \(100, 1\) squeezed to \(100,\)"):
        ts = load_test_set(EvalConfig(data=str(tmp_path / "n1.npz")), model_cfg)
    with torch.no_grad():
        pred = model(torch.stack([_normalized(im, model_cfg) for im in images])).argmax(1).numpy()
    expected = 100.0 * float((pred == labels).sum()) / 100
    assert top1(model, ts.batches(30)) == {"top1": pytest.approx(expected), "n": 100}


def test_top1_refuses_labels_that_do_not_match_the_predictions() -> None:
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    x, y = torch.randn(5, 3, 2, 2), torch.zeros(5, 1, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"labels of shape \(5, 1\) for 5 predictions"):
        top1(model, [(x, y)])


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (np.array([0, -1, 2]), r"label -1 at index 1 is not a class index \(0\.\.9"),
        (np.array([0, 10, 2]), r"label 10 at index 1 is not a class index \(0\.\.9: the model predicts 10 classes"),
        (np.array([0.0, 2.5, 1.0]), r"label 2\.5 at index 1 is not an integer"),
        (np.array([0.0, np.nan, 1.0]), r"label nan at index 1 is not an integer"),
        (np.array([0, 1]), r"3 images but 2 labels"),
        (np.array([[0, 1], [2, 3], [4, 5]]), r"1-D array of class indices, got shape \(3, 2\)"),
        (np.array([True, False, True]), r"integer class indices, got dtype bool"),
        (np.array(["0", "1", "2"]), r"integer class indices, got dtype <U1"),
    ],
)
def test_bad_labels_are_refused_in_one_line(labels: np.ndarray, message: str) -> None:
    with pytest.raises(DatasetError, match=message) as info:
        validate_labels(labels, num_images=3, num_classes=10, name="t")
    assert "\n" not in str(info.value)


def test_integral_float_labels_are_class_indices() -> None:
    out = validate_labels(np.array([0.0, 9.0, 3.0]), num_images=3, num_classes=10, name="t")
    assert out.dtype == np.int64 and out.tolist() == [0, 9, 3]


# --------------------------------------------------------------------------- images and preprocessing


def test_arrays_of_another_size_are_refused_when_the_spec_does_not_resize(tmp_path: Path) -> None:
    np.savez(tmp_path / "t.npz", images=np.zeros((2, 40, 40, 3), np.uint8), labels=np.array([0, 1]))
    with pytest.raises(DatasetError, match=r"images are 40x40, but the model takes 32x32") as info:
        load_test_set(EvalConfig(data=str(tmp_path / "t.npz")), resolve_model_config(TEACHER))
    assert "\n" not in str(info.value)


def test_arrays_of_another_size_get_the_spec_preprocessing_with_a_warning(tmp_path: Path) -> None:
    # 12 (H) x 10 (W) arrays, model.resize=10 (the shorter side is already 10: no interpolation),
    # centre crop 8: rows 2..9, columns 1..8 (top = round((12-8)/2), left = round((10-8)/2)).
    images = np.random.default_rng(0).integers(0, 256, (3, 12, 10, 3), dtype=np.uint8)
    np.savez(tmp_path / "t.npz", images=images, labels=np.array([4, 0, 7]))
    spec = TINY_IMAGENET_SPEC.model_copy(update={"resize": 10})
    with pytest.warns(UserWarning, match=r"12x10 arrays preprocessed by the model spec: shorter side resized to 10"):
        ts = load_test_set(EvalConfig(data=str(tmp_path / "t.npz"), num_workers=0), spec)
    x, y = _all(ts, 2)
    expected = torch.stack([_normalized(im[2:10, 1:9], spec) for im in images])
    torch.testing.assert_close(x, expected)
    assert y.tolist() == [4, 0, 7]


def test_image_files_are_resized_and_centre_cropped(tmp_path: Path) -> None:
    """A 2x upscale with nearest interpolation, then the centre 8x8: the hand-computed pixels."""
    pixels = _png(tmp_path / TENCH / "a.png", seed=1, size=(6, 5))  # H 6, W 5
    spec = TINY_IMAGENET_SPEC.model_copy(update={"resize": 10, "interpolation": "nearest"})
    x, y = _all(load_test_set(EvalConfig(data=str(tmp_path), classes="imagenet1k", num_workers=0), spec))
    up = pixels.repeat(2, axis=0).repeat(2, axis=1)  # 12 x 10
    torch.testing.assert_close(x[0], _normalized(up[2:10, 1:9], spec))
    assert y.tolist() == [0]


def test_image_files_of_another_size_are_refused_when_the_spec_does_not_resize(tmp_path: Path) -> None:
    _png(tmp_path / TENCH / "big.png", seed=0, size=(12, 12))
    with pytest.raises(DatasetError, match=r"big\.png: a 12x12 image, but the model takes 8x8") as info:
        load_test_set(EvalConfig(data=str(tmp_path), classes="imagenet1k"), TINY_IMAGENET_SPEC)  # when opened
    assert "\n" not in str(info.value)


def test_deprecated_eval_resize_still_resizes_with_a_warning(tmp_path: Path) -> None:
    pixels = _png(tmp_path / TENCH / "a.png", seed=2, size=(12, 10))
    cfg = EvalConfig(data=str(tmp_path), classes="imagenet1k", resize=10, num_workers=0)
    with pytest.warns(FutureWarning, match="eval.resize is deprecated: set model.resize"):
        x, _ = _all(load_test_set(cfg, TINY_IMAGENET_SPEC))
    torch.testing.assert_close(x[0], _normalized(pixels[2:10, 1:9], TINY_IMAGENET_SPEC))


def test_unreadable_image_is_a_one_line_error_from_a_worker(tmp_path: Path) -> None:
    _png(tmp_path / TENCH / "a.png", seed=0)
    (tmp_path / TENCH / "broken.jpg").write_bytes(b"not a jpeg")
    ts = load_test_set(EvalConfig(data=str(tmp_path), classes="imagenet1k", num_workers=2), TINY_IMAGENET_SPEC)
    with pytest.raises(DatasetError, match=r"broken\.jpg: cannot read the image") as info:
        _all(ts)
    assert "\n" not in str(info.value)


def test_parallel_decoding_keeps_the_order(tmp_path: Path) -> None:
    expected = {}
    for i in range(11):
        wnid = (TENCH, GOLDFISH, SHARK)[i % 3]
        expected[(wnid, i)] = _png(tmp_path / wnid / f"{i:02d}.png", seed=i)
    cfg = EvalConfig(data=str(tmp_path), classes="imagenet1k")
    x0, y0 = _all(load_test_set(cfg.model_copy(update={"num_workers": 0}), TINY_IMAGENET_SPEC), 3)
    x2, y2 = _all(load_test_set(cfg.model_copy(update={"num_workers": 2}), TINY_IMAGENET_SPEC), 3)
    torch.testing.assert_close(x2, x0, rtol=0, atol=0)
    assert y2.tolist() == y0.tolist()
    # Sorted folder order, sorted file order within a folder.
    order = sorted(expected)
    torch.testing.assert_close(x0, torch.stack([_normalized(expected[k], TINY_IMAGENET_SPEC) for k in order]))
    assert y0.tolist() == [{TENCH: 0, GOLDFISH: 1, SHARK: 2}[w] for w, _ in order]


# --------------------------------------------------------------------------- class lists and ImageFolder


def test_builtin_imagenet1k_class_list() -> None:
    ids = load_class_list("imagenet1k")
    assert len(ids) == 1000 and ids == sorted(ids)
    assert ids[:3] == [TENCH, GOLDFISH, SHARK] and ids[-1] == "n15075141" and ids.index("n02119789") == 278


def test_class_list_file_first_token_comments_and_duplicates(tmp_path: Path) -> None:
    f = tmp_path / "classes.txt"
    f.write_text("# my classes\ncat a small feline\n\ndog\nbird  a fowl\n")
    assert load_class_list(str(f)) == ["cat", "dog", "bird"]
    f.write_text("cat\ndog\ncat again\n")
    with pytest.raises(DatasetError, match="class 'cat' on line 3 is already on line 1"):
        load_class_list(str(f))
    with pytest.raises(DatasetError, match="not a built-in class list"):
        load_class_list(str(tmp_path / "missing.txt"))


def test_image_folder_subset_is_labelled_by_the_class_list(tmp_path: Path) -> None:
    _png(tmp_path / SHARK / "a.png", seed=0)
    _png(tmp_path / GOLDFISH / "b.png", seed=1)
    _png(tmp_path / GOLDFISH / "c.png", seed=2)
    (tmp_path / ".ipynb_checkpoints").mkdir()  # hidden folders are not classes
    ts = load_test_set(EvalConfig(data=str(tmp_path), classes="imagenet1k", num_workers=0), TINY_IMAGENET_SPEC)
    assert ts.num_samples == 3 and ts.num_classes == 1000
    assert _all(ts)[1].tolist() == [1, 1, 2]  # goldfish, goldfish, great white shark


def test_image_folder_subset_without_a_class_list_is_refused(tmp_path: Path) -> None:
    _png(tmp_path / SHARK / "a.png", seed=0)
    _png(tmp_path / GOLDFISH / "b.png", seed=1)
    with pytest.raises(DatasetError, match=r"2 class folders but the model predicts 1000 classes.*set eval\.classes"):
        load_test_set(EvalConfig(data=str(tmp_path)), TINY_IMAGENET_SPEC)


def test_image_folder_with_a_folder_outside_the_class_list(tmp_path: Path) -> None:
    _png(tmp_path / GOLDFISH / "b.png", seed=1)
    _png(tmp_path / "goldfish" / "c.png", seed=2)
    with pytest.raises(DatasetError, match=r"class folder 'goldfish' is not in the class list eval.classes=imagenet1k"):
        load_test_set(EvalConfig(data=str(tmp_path), classes="imagenet1k"), TINY_IMAGENET_SPEC)


def test_image_folder_of_all_classes_keeps_sorted_folder_order(tmp_path: Path) -> None:
    spec = TINY_IMAGENET_SPEC.model_copy(update={"num_classes": 3})
    for name in ("zebra", "ant", "mole"):
        _png(tmp_path / name / "x.png", seed=0)
    ts = load_test_set(EvalConfig(data=str(tmp_path), num_workers=0), spec)
    assert _all(ts)[1].tolist() == [0, 1, 2]  # ant, mole, zebra


def test_class_list_of_another_length_than_the_model(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"eval\.classes=imagenet1k lists 1000 classes but the model predicts 10"):
        load_test_set(EvalConfig(data=str(tmp_path), classes="imagenet1k"), resolve_model_config(TEACHER))


# --------------------------------------------------------------------------- flat folder + ground truth


def _flat(tmp_path: Path, lines: str) -> tuple[Path, Path]:
    folder = tmp_path / "val"
    _png(folder / "v1.png", seed=1)
    _png(folder / "v2.png", seed=2)
    (tmp_path / "gt.txt").write_text(lines)
    return folder, tmp_path / "gt.txt"


def test_flat_folder_with_indices_or_class_ids(tmp_path: Path) -> None:
    folder, gt = _flat(tmp_path, f"v2.png 999\nv1.png {GOLDFISH}\n")
    ts = load_test_set(
        EvalConfig(data=str(folder), labels=str(gt), classes="imagenet1k", num_workers=0), TINY_IMAGENET_SPEC
    )
    assert _all(ts)[1].tolist() == [999, 1]  # the ground truth's order


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ("v1.png 3\nv2.png 1000\n", r"label 1000 at index 1 is not a class index \(0\.\.999"),
        ("v1.png 3\n", r"'v2\.png' has no label in"),
        ("v1.png 3\nv2.png 4\nv3.png 5\n", r"'v3\.png' is not an image file in"),
        ("v1.png 3\nv1.png 4\nv2.png 4\n", r"'v1\.png' is listed twice"),
        ("v1.png n01440764\nv2.png 4\n", r"class 'n01440764' is not an index; set eval\.classes"),
        ("490\n361\n", r"'490' has no file name.*devkit"),
    ],
)
def test_flat_folder_ground_truth_errors(tmp_path: Path, lines: str, message: str) -> None:
    folder, gt = _flat(tmp_path, lines)
    with pytest.raises(DatasetError, match=message) as info:
        load_test_set(EvalConfig(data=str(folder), labels=str(gt)), TINY_IMAGENET_SPEC)
    assert "\n" not in str(info.value)


def test_flat_folder_without_ground_truth_says_how_to_give_it(tmp_path: Path) -> None:
    folder, _ = _flat(tmp_path, "")
    with pytest.raises(DatasetError, match=r"no class sub-folders: .*eval\.labels="):
        load_test_set(EvalConfig(data=str(folder)), TINY_IMAGENET_SPEC)


# --------------------------------------------------------------------------- model spec


@pytest.mark.parametrize(
    ("key", "value", "fixed"),
    [("mean", (123.7, 116.3, 103.5), "0.4851,0.4561,0.4059"), ("std", (58.4, 57.1, 57.4), "0.229,0.2239,0.2251")],
)
def test_normalization_on_the_0_255_scale_is_refused(key: str, value: tuple[float, ...], fixed: str) -> None:
    with pytest.raises(ValueError, match=rf"model\.{key}=.* divided by 255 \(model\.{key}={fixed}\)"):
        ModelConfig(**{key: value})


def test_plausible_normalizations_are_accepted() -> None:
    ModelConfig(mean=(1.0, 0.0, 0.5), std=(1.0, 2.0, 0.5))


# --------------------------------------------------------------------------- real ImageNet images


def _mobilenet(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[torch.nn.Module, ModelConfig]:
    folder = data_dir / "imagenet"
    monkeypatch.syspath_prepend(str(folder))
    spec = ModelConfig(
        arch="mobilenetv1_025:MobileNetV1",
        weights=str(folder / "mobilenetv1_025_imagenet.pth"),
        image_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )
    resolved = resolve_model_config(spec)
    assert resolved.resize_size == 256 and resolved.interpolation == "bilinear"  # the ImageNet default
    return create_model(resolved), resolved


@pytest.mark.slow
def test_official_layout_and_an_image_folder_subset_give_the_published_accuracy(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The official validation layout (flat folder + ground-truth list) gives the published 60.92%;
    the same images sorted into an ImageFolder of wnid folders (725 of the 1000 classes) and labelled
    through the built-in class list give the same images with the same labels, so the same score
    (the network runs once: on the ImageFolder's order)."""
    model, spec = _mobilenet(data_dir, monkeypatch)
    folder = data_dir / "imagenet"
    official = EvalConfig(data=str(folder / "val1300"), labels=str(folder / "val1300_labels.txt"))
    wnids = load_class_list(str(folder / "imagenet_classes.txt"))
    for line in (folder / "val1300_labels.txt").read_text().splitlines():
        name, index = line.split()
        (tmp_path / wnids[int(index)]).mkdir(exist_ok=True)
        (tmp_path / wnids[int(index)] / name).symlink_to(folder / "val1300" / name)
    assert sum(1 for _ in tmp_path.iterdir()) == 725  # a subset of the 1000 classes
    subset = EvalConfig(data=str(tmp_path), classes="imagenet1k")

    def decoded(cfg: EvalConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing adapted behind the user's back
            return list(load_test_set(cfg, spec).batches(100))

    def pairs(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[int, bytes]]:
        """(label, image bytes) of every image, in a canonical order."""
        return sorted((int(t), img.numpy().tobytes()) for x, y in batches for img, t in zip(x, y, strict=True))

    subset_batches = decoded(subset)
    assert pairs(subset_batches) == pairs(decoded(official))  # the same images with the same labels
    result = top1(model, iter(subset_batches))
    assert result["n"] == 1300 and result["top1"] == pytest.approx(60.92, abs=0.1)
