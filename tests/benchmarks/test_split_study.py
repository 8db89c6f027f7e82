"""The data-free choice of the shipped split (benchmarks/split_study.py)."""

from __future__ import annotations

from benchmarks.split_study import SHIPPED_SPLIT, split_choice


def test_split_choice_changes_the_shipped_split_only_when_both_signals_agree() -> None:
    labels = {SHIPPED_SPLIT: "shipped", "a": "A", "b": "B"}
    shipped = {"probe": [77.0, 78.0], "cross_kl": [0.20, 0.22]}  # std 0.707 and 0.0141
    # A: probe +2.5 (> 0.707) and KL -0.11 (> 0.0141): both prefer it. B: probe only.
    signals = {
        (SHIPPED_SPLIT, "W4A4"): shipped,
        ("a", "W4A4"): {"probe": [80.0, 80.2], "cross_kl": [0.10, 0.11]},
        ("b", "W4A4"): {"probe": [80.0, 80.2], "cross_kl": [0.30, 0.31]},
        ("c", "W4A4"): {"probe": [99.0], "cross_kl": [0.01]},  # one seed: no spread, not judged
    }
    labels["c"] = "C"
    assert split_choice(signals, "W4A4", labels).startswith("- W4A4: change to A (two data-free signals")
    assert "B by probe agreement only" in split_choice(signals, "W4A4", labels)
    assert "Not judged yet (one seed): C." in split_choice(signals, "W4A4", labels)
    # A's probe gain inside the spread (mean +0.6 < 0.707): nothing changes
    signals[("a", "W4A4")] = {"probe": [78.0, 78.2], "cross_kl": [0.10, 0.11]}
    text = split_choice(signals, "W4A4", labels)
    assert text.startswith("- W4A4: keep shipped") and "A by cross held-out KL only" in text


def test_split_choice_rules_out_a_challenger_one_judged_signal_does_not_prefer() -> None:
    """The rule needs both signals: a challenger whose probe agreement (two seeds) is not better
    than the shipped split's is out even while its cross held-out KL has one seed; one the probe
    prefers waits for the KL's second seed."""
    labels = {SHIPPED_SPLIT: "shipped", "d": "D", "e": "E"}
    signals = {
        (SHIPPED_SPLIT, "W4A4"): {"probe": [77.0, 78.0], "cross_kl": [0.20, 0.22]},
        ("d", "W4A4"): {"probe": [74.6, 75.0], "cross_kl": [0.01]},  # probe worse, KL one seed
        ("e", "W4A4"): {"probe": [80.0, 80.2], "cross_kl": [0.01]},  # probe better, KL one seed
    }
    text = split_choice(signals, "W4A4", labels)
    assert text.startswith("- W4A4: keep shipped")
    assert "Ruled out by one signal before the other has two seeds: D (probe agreement does not prefer it" in text
    assert "Not judged yet (one seed): E." in text


def test_a_tie_break_probe_decides_only_when_the_two_signals_disagree() -> None:
    """Probe for the challenger, cross KL against it: the tie-break probe (two seeds each side)
    carries it when it prefers it beyond the spread, and not when it does not; with no tie-break
    the incumbent stays. A challenger both signals reject is not rescued by the tie-break."""
    from benchmarks.split_study import data_choice

    labels = {"inc": "BNS+CE", "f": "F", "g": "G", "h": "H"}
    inc = {"probe": [9.0, 10.0], "cross_kl": [1.110, 1.112], "tiebreak": [13.0, 13.8]}  # tie std 0.57
    split = {"probe": [20.0, 25.0], "cross_kl": [1.16, 1.21]}  # probe for it, cross KL against it
    f = {**split, "tiebreak": [16.0, 16.5]}  # +2.85 over the incumbent, beyond std 0.57
    g = {**split, "tiebreak": [12.0, 14.4]}  # std 1.70: mean -0.2, inside it
    h = {"probe": [5.0, 5.2], "cross_kl": [1.3, 1.31], "tiebreak": [30.0, 30.2]}  # both signals against it
    assert data_choice({"inc": inc, "f": f}, "inc", labels).startswith("change to F (two data-free signals")
    text = data_choice({"inc": inc, "g": g, "h": h}, "inc", labels)
    assert (
        text.startswith("keep BNS+CE") and "G by probe agreement only (the tie-break probe does not prefer it)" in text
    )
    assert "H" not in text
    no_tie = {k: v for k, v in f.items() if k != "tiebreak"}
    text = data_choice({"inc": inc, "f": no_tie}, "inc", labels)
    assert text.startswith("keep BNS+CE") and "F by probe agreement only (no tie-break probe)" in text
