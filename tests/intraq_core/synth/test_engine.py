"""The synthesis engine on the real teacher, tiny budgets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from intraq_core.config import ModelConfig, SynthConfig
from intraq_core.models import create_model
from intraq_core.synth import engine
from intraq_core.synth.centres import ClassCentres
from intraq_core.synth.engine import Synthesizer, check_amp, cpu_flags, initial_noise


@pytest.fixture(scope="module")
def teacher() -> torch.nn.Module:
    return create_model(ModelConfig(arch="cifar_resnet20", weights="cifar10-resnet20"))


def _synth(teacher: torch.nn.Module, **kw: object) -> Synthesizer:
    cfg = SynthConfig(batch_size=16, iterations=kw.pop("iterations", 8), **kw)  # type: ignore[arg-type]
    return Synthesizer(teacher, cfg, image_shape=(3, 32, 32), num_classes=10)


LABELS = torch.arange(16) % 10
SEEDS = torch.arange(16) + 100


def test_initial_noise_is_per_image() -> None:
    a = initial_noise(torch.tensor([1, 2, 3]), (3, 4, 4))
    b = initial_noise(torch.tensor([3]), (3, 4, 4))
    assert torch.equal(a[2], b[0])


def test_same_seed_same_images(teacher: torch.nn.Module) -> None:
    s = _synth(teacher)
    r1 = s.synthesize(LABELS, SEEDS, batch_seed=5)
    r2 = s.synthesize(LABELS, SEEDS, batch_seed=5)
    assert torch.equal(r1.images, r2.images)
    r3 = s.synthesize(LABELS, SEEDS, batch_seed=6)  # other LOR/SIL randomness
    assert not torch.equal(r1.images, r3.images)


def test_optimization_lowers_the_loss(teacher: torch.nn.Module) -> None:
    r = _synth(teacher, iterations=30, lor=False).synthesize(LABELS, SEEDS, batch_seed=1)
    total = r.history["total"]
    assert len(total) == 30
    assert total[-1] < 0.5 * total[0]
    assert set(r.history) == {"bns_mean", "bns_var", "sil", "mdc_lower", "mdc_upper", "total"}
    assert r.features.shape == (16, 64)
    assert torch.isfinite(r.images).all()


def test_gaussian_method_returns_the_noise(teacher: torch.nn.Module) -> None:
    r = _synth(teacher, method="gaussian").synthesize(LABELS, SEEDS, batch_seed=1)
    assert torch.equal(r.images, initial_noise(SEEDS, (3, 32, 32)))
    assert r.iterations == 0


def test_bns_ce_preset_reaches_the_labels(teacher: torch.nn.Module) -> None:
    s = _synth(teacher, method="bns_ce", iterations=40)
    assert s.active_terms() == ["bns_mean", "bns_var", "ce"]
    r = s.synthesize(LABELS, SEEDS, batch_seed=1)
    with torch.no_grad():
        pred = teacher(r.images).argmax(1)
    assert (pred == LABELS).float().mean() > 0.8


def test_mdc_uses_centres(teacher: torch.nn.Module) -> None:
    # Centres equal to the features of the initial noise and a lower margin of 1.0 make the lower
    # hinge fire at once; without centres MDC is zero.
    s = _synth(teacher, mdc_lower=1.0, mdc_upper=2.0, iterations=3)
    store = ClassCentres(10, 64)
    store.update(s.features(initial_noise(SEEDS, (3, 32, 32))), LABELS)
    with_c = s.synthesize(LABELS, SEEDS, batch_seed=1, centres=store.snapshot())
    without = s.synthesize(LABELS, SEEDS, batch_seed=1)
    assert with_c.history["mdc_lower"][0] > 0.5
    assert without.history["mdc_lower"][0] == 0.0


def test_adi_term_runs_with_a_quantized_student(teacher: torch.nn.Module) -> None:
    s = _synth(teacher, method="adi", iterations=3)
    assert "adi" in s.active_terms() and "mdc_lower" not in s.active_terms()
    r = s.synthesize(LABELS, SEEDS, batch_seed=1)
    assert 0.0 <= r.history["adi"][0] <= 1.0


def test_teacher_is_not_modified(teacher: torch.nn.Module) -> None:
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    _synth(teacher, iterations=2).synthesize(LABELS, SEEDS, batch_seed=1)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k])


def test_clip_pixels_keeps_images_in_the_valid_range(teacher: torch.nn.Module) -> None:
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    cfg = SynthConfig(batch_size=16, iterations=5, clip_pixels=True)
    s = Synthesizer(teacher, cfg, image_shape=(3, 32, 32), num_classes=10, normalization=(mean, std))
    r = s.synthesize(LABELS, SEEDS, batch_seed=1)
    pixels = r.images * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    with pytest.raises(ValueError, match="normalization"):
        Synthesizer(teacher, cfg, image_shape=(3, 32, 32), num_classes=10)


@pytest.mark.parametrize("channels_last", [True, False])
def test_channel_stats_match_var_mean(channels_last: bool) -> None:
    from intraq_core.synth.bn_stats import channel_stats

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = (torch.randn(32, 8, 6, 6) * 3 + 2).contiguous(memory_format=fmt).requires_grad_(True)
    y = x.detach().clone().requires_grad_(True)
    w = torch.arange(8.0)
    v, m = channel_stats(x)
    (v * w + m).sum().backward()
    v2, m2 = torch.var_mean(y, dim=(0, 2, 3), unbiased=False)
    (v2 * w + m2).sum().backward()
    torch.testing.assert_close(v, v2)
    torch.testing.assert_close(m, m2)
    torch.testing.assert_close(x.grad, y.grad)


def test_compile_on_a_cpu_without_a_cpp_compiler_is_refused_when_the_synthesizer_is_built(
    teacher: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch._inductor.cpp_builder as builder
    from torch._inductor.exc import InvalidCxxCompiler

    def no_compiler() -> str:
        raise InvalidCxxCompiler()

    monkeypatch.setattr(builder, "get_cpp_compiler", no_compiler)
    with pytest.raises(ValueError, match=r"generate.compile=true on a CPU needs a C\+\+ compiler .*InvalidCxxCompiler"):
        _synth(teacher, compile=True)
    _synth(teacher, compile=False)  # eager needs none


def test_cpu_flags_read_x86_and_arm_cpuinfo(tmp_path: Path) -> None:
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel name\t: EPYC\nflags\t\t: fpu avx avx2 fma\n\nprocessor\t: 1\nflags\t: x\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\nCPU implementer\t: 0x41\n")
    assert cpu_flags(str(x86)) == {"fpu", "avx", "avx2", "fma"}  # the first processor's
    assert cpu_flags(str(arm)) == {"fp", "asimd", "bf16", "i8mm"}
    assert cpu_flags(str(tmp_path / "missing")) == frozenset()


def test_bf16_autocast_on_a_cpu_without_native_bf16_is_refused_when_the_synthesizer_is_built(
    teacher: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Emulated bf16 made a 32x32 forward/backward ~15x slower on an AVX2 machine: refused, not run."""
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match=r"generate.amp=bf16 on this CPU .*set generate.amp=off"):
        check_amp(SynthConfig(amp="bf16"), cpu, frozenset({"avx", "avx2", "fma", "avx512f"}))
    for native in ("avx512_bf16", "amx_bf16", "bf16"):
        check_amp(SynthConfig(amp="bf16"), cpu, frozenset({"avx2", native}))
    check_amp(SynthConfig(amp="bf16"), torch.device("cuda"), frozenset())  # GPUs: not a CPU question
    check_amp(SynthConfig(amp="off"), cpu, frozenset())
    monkeypatch.setattr(engine, "cpu_flags", lambda: frozenset({"avx2"}))
    with pytest.raises(ValueError, match=r"no native bf16"):
        _synth(teacher, amp="bf16")
    monkeypatch.setattr(engine, "cpu_flags", lambda: frozenset({"avx2", "amx_bf16"}))
    assert _synth(teacher, amp="bf16").cfg.amp == "bf16"
