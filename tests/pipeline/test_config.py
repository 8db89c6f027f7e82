"""Run config: defaults, YAML round trip, --set overrides, one-line errors with suggestions."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import ConfigError, RunConfig, load_run_config, parse_overrides, shipped_configs


def test_defaults_are_the_reference_generation_budget() -> None:
    cfg = RunConfig()
    g = cfg.generate
    assert (g.num_images, g.batch_size, g.iterations, g.lr) == (5120, 256, 1000, 0.5)
    assert (g.sil_epsilon, g.mdc_lower, g.mdc_upper, g.lor_min_area) == (0.95, 0.05, 0.8, 0.5)
    assert g.weights() == {"bns": 1.0, "ce": 0.0, "sil": 1.0, "mdc": 1.0, "adi": 0.0}
    assert g.lor_enabled()
    assert cfg.model.weights == "cifar10-resnet20"


def test_yaml_round_trip(tmp_path: Path) -> None:
    cfg = load_run_config(None, ["generate.method=bns_ce", "quant.w_bits=3", "distill.lr=2e-3", "seed=7"])
    path = tmp_path / "run.yaml"
    path.write_text(cfg.to_yaml())
    again = load_run_config(path)
    assert again == cfg
    assert again.config_hash() == cfg.config_hash()
    assert again.generate.weights()["ce"] == 1.0 and again.generate.weights()["sil"] == 0.0


def test_overrides_parse_yaml_values() -> None:
    out = parse_overrides(["distill.crop_scale=[0.3, 1.0]", "generate.lor=false", "ray.use_gpu=no"])
    assert out == {
        "distill": {"crop_scale": [0.3, 1.0]},
        "generate": {"lor": False},
        "ray": {"use_gpu": False},
    }
    cfg = load_run_config(None, ["ray.use_gpu=no", "generate.lor=false"])
    assert cfg.ray.use_gpu == "no" and not cfg.generate.lor_enabled()


def test_unknown_key_suggests_the_closest() -> None:
    with pytest.raises(ConfigError, match=r"did you mean 'generate.sil_epsilon'"):
        load_run_config(None, ["generate.sil_epsion=0.9"])
    with pytest.raises(ConfigError, match=r"did you mean 'distill'"):
        load_run_config(None, ["distil.lr=0.1"])


def test_unknown_key_in_yaml(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("generate:\n  iterashuns: 5\n")
    with pytest.raises(ConfigError, match=r"unknown key 'iterashuns'.*did you mean 'iterations'"):
        load_run_config(p)


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("quant.w_bits=9", "w_bits"),
        ("quant.a_bits=1", "a_bits"),
        ("distill.lr=0", "lr"),
        ("distill.lr=-1", "lr"),
        ("distill.batch_size=0", "batch_size"),
        ("generate.iterations=0", "iterations"),
        ("generate.num_images=-5", "num_images"),
    ],
)
def test_out_of_range_values(override: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_run_config(None, [override])


def test_malformed_yaml_names_the_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("generate:\n  iterations: 5\n   lr: [1,\n")
    with pytest.raises(ConfigError, match=r"malformed YAML .* line"):
        load_run_config(p)


def test_missing_config_file() -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_run_config("no/such/file.yaml")


def test_shipped_configs_validate() -> None:
    names = shipped_configs()
    assert {"smoke", "cifar10_resnet20_w4a4", "cifar10_resnet20_w3a3"} <= set(names)
    for name in names:
        load_run_config(name)


def test_model_output_enters_the_hashes_only_when_set() -> None:
    """Unset, ``model.output`` is left out of the model's identity, so the hashes of every run written before
    it existed stay the same (``--resume`` still accepts them); set, it changes the dataset."""
    from pipeline.config import _model_identity

    plain = RunConfig()
    assert _model_identity(plain) == {
        k: v
        for k, v in plain.model.model_dump(mode="json").items()
        if k not in ("kwargs", "output", "resize", "crop_pct", "interpolation")
    }
    tuple_model = load_run_config(None, ["model.output=0"])
    assert tuple_model.model.output == 0 and _model_identity(tuple_model)["output"] == 0
    assert tuple_model.dataset_hash() != plain.dataset_hash() and tuple_model.config_hash() != plain.config_hash()
    assert load_run_config(None, ["model.output=logits"]).model.output == "logits"


def test_dataset_hash_ignores_training_settings() -> None:
    a = load_run_config(None, ["quant.w_bits=4"])
    b = load_run_config(
        None, ["quant.w_bits=3", "distill.epochs=3", "generate.channels_last=false", "generate.groups_per_pass=4"]
    )
    c = load_run_config(None, ["generate.iterations=10"])
    assert a.dataset_hash() == b.dataset_hash() != c.dataset_hash()
    assert a.config_hash() != b.config_hash()


def test_model_normalization_takes_lists_or_comma_separated_numbers() -> None:
    from pipeline.config import load_run_config

    as_list = load_run_config(None, ["model.mean=[0.4914,0.4822,0.4465]", "model.std=(0.2023, 0.1994, 0.2010)"])
    as_text = load_run_config(None, ["model.mean=0.4914,0.4822,0.4465", "model.std=0.2023,0.1994,0.2010"])
    assert as_list.model.mean == as_text.model.mean == (0.4914, 0.4822, 0.4465)
    assert as_list.model.std == as_text.model.std == (0.2023, 0.1994, 0.2010)


@pytest.mark.parametrize(
    ("name", "dataset_hash", "config_hash"),
    [
        ("smoke", "b0d0e81799f5ebff", "0dfb49b42349400d"),
        ("cifar10_resnet20_w4a4_cpu", "e9195250ded315a8", "a34b603bdbf771a4"),
        ("imagenet_mobilenetv1_025_w4a4_cpu", "6cb2441e0c0d4f18", "49cdb755e84bcc73"),
    ],
)
def test_new_keys_at_their_defaults_keep_the_hashes_of_datasets_already_written(
    name: str, dataset_hash: str, config_hash: str
) -> None:
    """The hashes as commit 7fca5b1 computed them (the ImageNet dataset hash is the manifest's of the
    datasets in benchmarks/results/imagenet-mobilenetv1-cpu.md; its config hash is the one after the
    config's reconstruction pool became 1,024 images): a key added since with its default (e.g.
    generate.min_images_per_class) must not orphan the datasets and runs written before it."""
    cfg = load_run_config(name)
    assert (cfg.dataset_hash(), cfg.config_hash()) == (dataset_hash, config_hash)


@pytest.mark.parametrize("name", [n for n in shipped_configs() if n not in ("smoke", "probe_cpu")])
def test_every_shipped_accuracy_config_sizes_its_data_from_the_class_count(name: str) -> None:
    """The class-count rule is part of the shipped recipe: at least one image per class."""
    assert load_run_config(name).generate.min_images_per_class == 1.0


@pytest.mark.parametrize(
    ("name", "classes", "plan"),
    [
        # 512 x 120 = 61,440 image-iterations -> one image per class in whole batches of 256
        ("imagenet_mobilenetv1_025_w4a4_cpu", 1000, (1024, 60)),
        # 2,000 classes would need 2,048 images x 30 iterations: capped at 60 iterations per image
        ("imagenet_mobilenetv1_025_w4a4_cpu", 2000, (1024, 60)),
        ("imagenet_mobilenetv1_025_w4a4_cpu", 500, (512, 120)),
        # 1,280 x 150 = 192,000: 2,048 images x round(93.75) iterations for 2,000 classes
        ("cifar10_resnet20_w4a4_cpu", 2000, (2048, 94)),
        ("cifar10_resnet20_w4a4_cpu", 100, (1280, 150)),
    ],
)
def test_shipped_plans_for_many_class_teachers(name: str, classes: int, plan: tuple[int, int]) -> None:
    g = load_run_config(name).generate.for_classes(classes)
    assert (g.num_images, g.iterations) == plan
