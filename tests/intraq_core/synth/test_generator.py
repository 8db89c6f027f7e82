"""GDFQ's conditional generator and Qimera's boundary samples: architecture, targets, training, resume."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from intraq_core.config import ModelConfig, SynthConfig
from intraq_core.synth.generator import ConditionalGenerator, GeneratorSampler, GeneratorTrainer, build_generator


def tiny_teacher() -> nn.Module:
    """conv-BN-ReLU ×2 with a pooled head, random but fixed (determinism tests only)."""
    torch.manual_seed(7)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 5),
    )
    return model.eval()


def cfg(method: str = "qimera", **kw: object) -> SynthConfig:
    base = {"generator_batch_size": 8, "generator_latent_dim": 16, "generator_iterations": 6}
    return SynthConfig(method=method, **{**base, **kw})


def test_generator_shapes_standardized_output_and_errors():
    g = ConditionalGenerator(5, 16, (3, 16, 12), style="gdfq").train()
    images = g(torch.randn(6, 16), torch.arange(6) % 5)
    assert images.shape == (6, 3, 16, 12)
    # The last BN has no affine parameters: in train mode every channel is standardized.
    torch.testing.assert_close(images.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    # (variance v / (v + eps) with eps = 1e-5 on a small pre-BN variance: slightly below 1)
    torch.testing.assert_close(images.var(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-2, rtol=0)
    with pytest.raises(ValueError, match="divisible by 4"):
        ConditionalGenerator(5, 16, (3, 30, 30))
    with pytest.raises(ValueError, match="qimera"):
        g(torch.randn(2, 2, 16), torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), 0.5))


def test_superposition_with_a_one_hot_mix_is_the_single_class_image():
    g = build_generator(cfg(), 5, (3, 8, 8), seed=0).eval()
    z = torch.randn(4, 2, 16)
    labels = torch.tensor([[0, 3], [1, 1], [4, 2], [2, 0]])
    one = torch.tensor([[1.0, 0.0]]).expand(4, 2)
    torch.testing.assert_close(g(z, labels, one), g(z[:, 0], labels[:, 0]), rtol=1e-5, atol=1e-6)
    half = torch.tensor([[0.5, 0.5]]).expand(4, 2)
    assert not torch.allclose(g(z, labels, half)[0], g(z[:, 0], labels[:, 0])[0])


def test_the_mapping_layer_is_optional_and_gdfq_multiplies_embedding_and_latent():
    with_map = build_generator(cfg(), 5, (3, 8, 8), seed=0)
    without = build_generator(cfg(qimera_mapping=False), 5, (3, 8, 8), seed=0)
    assert isinstance(with_map.mapping, nn.Linear) and without.mapping is None
    gdfq = build_generator(cfg("gdfq"), 5, (3, 8, 8), seed=0)
    z, y = torch.randn(3, 16), torch.tensor([0, 1, 2])
    torch.testing.assert_close(gdfq._embed(z, y), gdfq.label_emb(y) * z)


def test_boundary_batches_have_soft_targets_from_the_mixing_coefficients():
    trainer = GeneratorTrainer(
        tiny_teacher(), cfg(qimera_mix_prob=1.0, qimera_mix_classes=3), num_classes=5, image_shape=(3, 8, 8), seed=0
    )
    z, labels, weights, target = trainer._batch()
    assert z.shape == (8, 3, 16) and labels.shape == (8, 3) and weights is not None
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(8))
    torch.testing.assert_close(target.sum(dim=1), torch.ones(8))
    for i in range(8):
        want = torch.zeros(5)
        for c, w in zip(labels[i].tolist(), weights[i].tolist(), strict=True):
            want[c] += w
        torch.testing.assert_close(target[i], want)
    plain = GeneratorTrainer(tiny_teacher(), cfg("gdfq"), num_classes=5, image_shape=(3, 8, 8), seed=0)
    _, labels, weights, target = plain._batch()
    assert weights is None
    torch.testing.assert_close(target, torch.nn.functional.one_hot(labels, 5).float())


def test_training_resumes_exactly_from_a_checkpoint():
    def trainer() -> GeneratorTrainer:
        return GeneratorTrainer(tiny_teacher(), cfg(qimera_mix_prob=0.5), num_classes=5, image_shape=(3, 8, 8), seed=3)

    straight = trainer()
    straight.train()
    assert straight.done and straight.iteration == 6

    first = trainer()
    saved: list[dict] = []
    first.train(checkpoint_every=2, on_checkpoint=lambda t: saved.append(t.state_dict()))
    assert [s["iteration"] for s in saved] == [2, 4, 6]
    resumed = trainer()
    resumed.load_state_dict(saved[1])  # a run killed after the checkpoint of iteration 4
    resumed.train()
    assert resumed.history == straight.history
    for k, v in straight.generator.state_dict().items():
        assert torch.equal(resumed.generator.state_dict()[k], v), k
    other_seed = GeneratorTrainer(
        tiny_teacher(), cfg(qimera_mix_prob=0.5), num_classes=5, image_shape=(3, 8, 8), seed=4
    )
    other_seed.train()
    assert other_seed.history != straight.history


def test_sampler_is_deterministic_per_shard_and_draws_each_image_from_its_own_seed():
    c = cfg(qimera_mix_prob=0.5)
    trainer = GeneratorTrainer(tiny_teacher(), c, num_classes=5, image_shape=(3, 8, 8), seed=0)
    trainer.train()
    sampler = GeneratorSampler(tiny_teacher(), c, trainer.state_dict(), image_shape=(3, 8, 8), num_classes=5)
    labels, seeds = torch.arange(12) % 5, torch.arange(100, 112)
    whole = sampler.synthesize(labels, seeds, batch_seed=0)
    again = GeneratorSampler(tiny_teacher(), c, trainer.state_dict(), image_shape=(3, 8, 8), num_classes=5)
    assert torch.equal(again.synthesize(labels, seeds, batch_seed=0).images, whole.images)
    assert whole.images.shape == (12, 3, 8, 8) and whole.features.shape == (12, 4)
    assert torch.equal(whole.labels, labels)
    # The inputs of an image depend on its seed only, not on the rest of the shard.
    z, classes, weights = sampler.draw(labels, seeds)
    z_part, classes_part, weights_part = sampler.draw(labels[4:9], seeds[4:9])
    assert torch.equal(z_part, z[4:9]) and torch.equal(classes_part, classes[4:9])
    assert torch.equal(weights_part, weights[4:9])
    mixed = weights[:, 0] < 1.0
    assert 0 < int(mixed.sum()) < 12  # about half are boundary-supporting samples
    assert torch.equal(classes[:, 0], labels)  # the plan label has the largest coefficient
    assert (weights[:, 0] >= weights[:, 1]).all()
    assert whole.final["boundary_fraction"] == pytest.approx(float(mixed.float().mean()))
    assert whole.history["total"] == trainer.history["total"]
    unfinished = {**trainer.state_dict(), "done": False}
    with pytest.raises(ValueError, match="not finished"):
        GeneratorSampler(tiny_teacher(), c, unfinished, image_shape=(3, 8, 8), num_classes=5)


def test_training_against_the_shared_teacher_makes_it_recognize_the_classes(teacher_path):
    """A data-free signal: the teacher's accuracy on the generator's images rises from chance."""
    from intraq_core.models import create_model, resolve_model_config

    teacher = create_model(resolve_model_config(ModelConfig(arch="cifar_resnet20", weights=str(teacher_path)))).eval()
    c = SynthConfig(method="qimera", generator_batch_size=8, generator_iterations=15)
    trainer = GeneratorTrainer(teacher, c, num_classes=10, image_shape=(3, 32, 32), seed=0)

    def teacher_accuracy() -> float:
        sampler = GeneratorSampler(
            teacher, c, {**trainer.state_dict(), "done": True}, image_shape=(3, 32, 32), num_classes=10
        )
        labels = torch.arange(50) % 10
        images = sampler.synthesize(labels, torch.arange(50), batch_seed=0).images
        with torch.no_grad():
            return float((teacher(images).argmax(1) == labels).float().mean())

    before = teacher_accuracy()
    trainer.train()
    after = teacher_accuracy()
    assert before < 0.3 < after
    assert trainer.history["ce"][-1] < trainer.history["ce"][0]
