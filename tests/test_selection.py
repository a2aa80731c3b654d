"""Stochastic Quantization selection: probabilities, exact counts, determinism, draw frequencies."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from esq_lightning.quant import num_quantized, sample_selection, selection_probabilities, sq_generator

ERR = torch.tensor([0.05, 0.4, 0.2, 0.8, 0.1, 0.3])


def inclusion_probabilities(p: np.ndarray, k: int) -> np.ndarray:
    """Exact P(i among the first k draws) of sequential roulette without replacement, by enumeration."""
    incl = np.zeros(len(p))
    for seq in itertools.permutations(range(len(p)), k):
        prob, left = 1.0, 1.0
        for i in seq:
            prob *= p[i] / left
            left -= p[i]
        for i in seq:
            incl[i] += prob
    return incl


def frequencies(err: torch.Tensor, ratio: float, n: int, seed: int, **kw: str) -> np.ndarray:
    gen = torch.Generator().manual_seed(seed)
    counts = torch.zeros(err.numel())
    for _ in range(n):
        counts += sample_selection(err, ratio, gen, **kw)
    return (counts / n).double().numpy()


def assert_binomial(freq: np.ndarray, prob: np.ndarray, n: int, sigmas: float = 5.0) -> None:
    # Each filter's count is Binomial(n, prob_i); 5 sigma fails by chance with probability ~6e-7.
    bound = sigmas * np.sqrt(prob * (1 - prob) / n) + 1.0 / n
    assert np.all(np.abs(freq - prob) <= bound), (freq, prob, bound)


# ---------------------------------------------------------------- probabilities
def test_probability_formulas() -> None:
    e = ERR.double().numpy()
    x = 1.0 / (e + 1e-7)
    expected = {
        "constant": np.ones_like(x),
        "linear": x,
        "softmax": np.exp(x - x.max()),
        "sigmoid": 1.0 / (1.0 + np.exp(-x)),
    }
    for f, w in expected.items():
        p = selection_probabilities(ERR, "paper", f)
        assert p.dtype == torch.float64
        np.testing.assert_allclose(p.numpy(), w / w.sum(), rtol=1e-12, err_msg=f)
    p_ref = selection_probabilities(ERR, "reference")
    np.testing.assert_allclose(p_ref.numpy(), e / e.sum(), rtol=1e-12)
    # Lower error, more likely quantized (paper); higher error, more likely kept (reference).
    assert int(selection_probabilities(ERR).argmax()) == 0
    assert int(p_ref.argmax()) == 3


def test_degenerate_errors() -> None:
    zeros = torch.zeros(4)
    np.testing.assert_allclose(selection_probabilities(zeros, "reference").numpy(), np.full(4, 0.25))
    np.testing.assert_allclose(selection_probabilities(zeros, "paper", "softmax").numpy(), np.full(4, 0.25))
    nan = torch.tensor([float("nan"), 0.5, 0.5])
    p = selection_probabilities(nan, "reference")
    assert torch.isfinite(p).all() and abs(float(p.sum()) - 1) < 1e-12
    # Softmax with one error-free filter puts all mass on it; the other picks must still be
    # made (uniformly) instead of failing inside torch.multinomial.
    err = torch.tensor([0.0, 0.3, 0.5, 0.7, 0.9])
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        mask = sample_selection(err, 0.6, gen, f="softmax")
        assert bool(mask[0]) and int(mask.sum()) == 3
    mask = sample_selection(torch.zeros(5), 0.4, gen, variant="reference")
    assert int(mask.sum()) == 2


def test_choices_are_validated() -> None:
    with pytest.raises(ValueError, match="paper, reference"):
        selection_probabilities(ERR, "dong")
    with pytest.raises(ValueError, match="constant, linear, softmax, sigmoid"):
        sample_selection(ERR, 0.5, None, f="tanh")


# ---------------------------------------------------------------- counts and determinism
@pytest.mark.parametrize("variant", ["paper", "reference"])
def test_exact_number_quantized(variant: str) -> None:
    gen = torch.Generator().manual_seed(1)
    for n in (1, 3, 10, 16, 64, 160):
        err = torch.rand(n, generator=gen)
        for ratio in (-0.5, 0.0, 0.1, 0.2, 0.25, 0.4, 0.5, 0.6, 0.8, 0.99, 1.0, 1.5):
            mask = sample_selection(err, ratio, gen, variant=variant)
            expected = min(n, max(0, round(ratio * n)))
            assert mask.dtype == torch.bool and mask.shape == (n,)
            assert int(mask.sum()) == expected == num_quantized(ratio, n), (n, ratio)


def test_ratio_1_and_0_draw_nothing() -> None:
    gen = torch.Generator().manual_seed(2)
    state = gen.get_state()
    assert bool(sample_selection(ERR, 1.0, gen).all())
    assert not bool(sample_selection(ERR, 0.0, gen).any())
    assert not bool(sample_selection(ERR, 0.01, gen).any())  # round(0.06) = 0
    assert torch.equal(gen.get_state(), state)


def test_same_seed_same_draw() -> None:
    err = torch.rand(64, generator=torch.Generator().manual_seed(3))
    for variant in ("paper", "reference"):
        a = sample_selection(err, 0.5, torch.Generator().manual_seed(11), variant=variant)
        b = sample_selection(err, 0.5, torch.Generator().manual_seed(11), variant=variant)
        c = sample_selection(err, 0.5, torch.Generator().manual_seed(12), variant=variant)
        assert torch.equal(a, b)
        assert not torch.equal(a, c)  # identical by chance with probability < 1e-10


def test_sq_generator_is_a_function_of_seed_and_step() -> None:
    err = torch.rand(64, generator=torch.Generator().manual_seed(4))
    gen = sq_generator(0, 0)
    assert isinstance(gen, torch.Generator) and gen.device.type == "cpu"
    draw = {(s, t): sample_selection(err, 0.5, sq_generator(s, t)) for s in (0, 1) for t in (0, 1, 10**9)}
    assert torch.equal(draw[(0, 0)], sample_selection(err, 0.5, sq_generator(0, 0)))
    masks = list(draw.values())
    assert all(not torch.equal(a, b) for a, b in itertools.combinations(masks, 2))
    # Seeds fit in 63 bits for any int seed and step (negative and huge included).
    assert 0 <= sq_generator(-5, 2**70).initial_seed() < 2**63
    assert sq_generator(3, 4).initial_seed() == sq_generator(3, 4).initial_seed()
    assert sq_generator(3, 4).initial_seed() != sq_generator(4, 3).initial_seed()


def test_mask_on_err_device_with_cpu_generator() -> None:
    err = ERR.to(torch.float32)
    mask = sample_selection(err, 0.5, None)
    assert mask.device == err.device and int(mask.sum()) == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_same_draw_on_cuda() -> None:
    err = torch.rand(64, generator=torch.Generator().manual_seed(5))
    cpu = sample_selection(err, 0.4, sq_generator(1, 2))
    cuda = sample_selection(err.cuda(), 0.4, sq_generator(1, 2))
    assert cuda.device.type == "cuda" and torch.equal(cpu, cuda.cpu())


# ---------------------------------------------------------------- draw frequencies
def test_single_pick_frequency_matches_probability() -> None:
    n = 20000
    prob = selection_probabilities(ERR).numpy()
    assert_binomial(frequencies(ERR, 1 / 6, n, seed=6), prob, n)


@pytest.mark.parametrize("k", [2, 3])
def test_multi_pick_frequency_matches_sequential_roulette(k: int) -> None:
    err = ERR[:5]
    n = 10000
    prob = inclusion_probabilities(selection_probabilities(err).numpy(), k)
    assert math.isclose(prob.sum(), k)
    assert_binomial(frequencies(err, k / 5, n, seed=7 + k), prob, n)


def test_reference_variant_keeps_filters_proportional_to_error() -> None:
    n = 10000
    # ratio 4/6: two filters are kept in full precision, drawn by roulette with p ∝ e.
    kept = inclusion_probabilities((ERR / ERR.sum()).double().numpy(), 2)
    freq = frequencies(ERR, 4 / 6, n, seed=10, variant="reference")
    assert_binomial(1 - freq, kept, n)


@pytest.mark.parametrize("f", ["constant", "softmax", "sigmoid"])
def test_every_f_frequency(f: str) -> None:
    # Errors of order 1 keep the softmax of 1/e away from one-hot so that all filters have mass.
    err = torch.tensor([0.5, 0.8, 1.0, 2.0])
    n = 5000
    prob = selection_probabilities(err, f=f).numpy()
    assert np.all(prob > 0.01)
    assert_binomial(frequencies(err, 0.25, n, seed=20, f=f), prob, n)
