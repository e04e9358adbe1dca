"""Latent maths (aegan_core/latents.py): seeded sampling, truncation, interpolation, checks."""

from __future__ import annotations

import numpy as np
import pytest

from aegan_core.errors import RequestError
from aegan_core.latents import (
    MAX_SEED,
    check_latents,
    interpolate,
    lerp,
    prior_name,
    random_seed,
    sample_prior,
    slerp,
)


def test_seeded_samples_are_repeatable_and_prefix_stable():
    a = sample_prior(8, 32, seed=7)
    assert a.shape == (8, 32) and a.dtype == np.float32
    np.testing.assert_array_equal(a, sample_prior(8, 32, seed=7))
    np.testing.assert_array_equal(a[:3], sample_prior(3, 32, seed=7))  # same first k, any n
    assert not np.allclose(a, sample_prior(8, 32, seed=8))
    assert abs(float(a.std()) - 1.0) < 0.3  # N(0, I)


def test_truncation_pulls_towards_the_mean():
    z = sample_prior(4, 16, seed=1)
    np.testing.assert_allclose(sample_prior(4, 16, seed=1, truncation=0.5), z * 0.5, rtol=1e-6)
    assert not sample_prior(4, 16, seed=1, truncation=0.0).any()


def test_uniform_prior_and_prior_names():
    z = sample_prior(100, 8, seed=0, prior="uniform")
    assert -1 <= z.min() < -0.9 and 0.9 < z.max() <= 1  # spread over the whole of [-1, 1]
    assert prior_name("normal(0, I)") == "normal"
    assert prior_name({"type": "Gaussian"}) == "normal"
    assert prior_name("N(0, I)") == "normal"
    assert prior_name("uniform(-1, 1)") == "uniform"
    with pytest.raises(ValueError, match="unknown latent prior"):
        prior_name("laplace")


def test_slerp_keeps_ends_and_follows_the_arc():
    a, b = np.array([1.0, 0.0]), np.array([0.0, 2.0])
    path = slerp(a, b, np.linspace(0, 1, 5))
    np.testing.assert_allclose(path[0], a, atol=1e-12)
    np.testing.assert_allclose(path[-1], b, atol=1e-12)
    angles = np.arctan2(path[:, 1], path[:, 0])
    np.testing.assert_allclose(np.diff(angles), np.pi / 8, atol=1e-9)  # constant angular speed
    assert np.linalg.norm(path[2]) > np.linalg.norm(lerp(a, b, np.array([0.5]))[0])
    # the other way round (a unit end point last): half way is norm 1.5 at 45 degrees
    middle = slerp(b, a, np.array([0.5]))[0]
    np.testing.assert_allclose(middle, [1.5 / np.sqrt(2), 1.5 / np.sqrt(2)], atol=1e-12)


def test_slerp_at_an_angle_other_than_a_right_angle():
    """60 degrees apart (at 90 degrees sin(omega) is 1 and the two sines of the arc are mirror
    images, which hides a wrong sign or a wrong scale)."""
    omega = np.pi / 3
    a, b = np.array([1.0, 0.0]), 3.0 * np.array([np.cos(omega), np.sin(omega)])
    t = np.array([0.25, 0.5, 0.75])
    path = slerp(a, b, t)
    np.testing.assert_allclose(np.arctan2(path[:, 1], path[:, 0]), t * omega, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(path, axis=1), 1.0 + 2.0 * t, atol=1e-12)


def test_slerp_degenerate_cases_fall_back_to_lerp():
    a = np.array([1.0, 1.0])
    t = np.linspace(0, 1, 3)
    np.testing.assert_allclose(slerp(a, 2 * a, t), lerp(a, 2 * a, t))  # parallel
    np.testing.assert_allclose(slerp(np.zeros(2), a, t), lerp(np.zeros(2), a, t))  # zero
    ones = np.ones(3)  # its unit vector's dot with itself rounds to 1 + 2**-52: clipped to 1
    np.testing.assert_allclose(slerp(ones, 2 * ones, t), lerp(ones, 2 * ones, t))
    # antiparallel: the dot rounds to -1 - 2**-52, clipped to -1 (no NaN from arccos)
    np.testing.assert_allclose(slerp(ones, -2 * ones, t), lerp(ones, -2 * ones, t))


@pytest.mark.parametrize("method", ["slerp", "lerp"])
def test_interpolate_has_exact_end_points(method):
    z = sample_prior(2, 32, seed=3)
    path = interpolate(z[0], z[1], 7, method)
    assert path.shape == (7, 32) and path.dtype == np.float32
    np.testing.assert_array_equal(path[0], z[0])
    np.testing.assert_array_equal(path[-1], z[1])


def test_check_latents_names_the_bad_value():
    np.testing.assert_array_equal(check_latents([[1.0, 2.0]], 2, "latents"), [[1.0, 2.0]])
    with pytest.raises(RequestError, match=r"latents\[1\] has 3 values; .* latent_dim is 2"):
        check_latents([[0.0, 0.0], [0.0, 0.0, 0.0]], 2, "latents")
    with pytest.raises(RequestError, match=r"latents\[0\]\[1\] = nan: .*finite"):
        check_latents([[0.0, float("nan")]], 2, "latents")
    with pytest.raises(RequestError, match=r"latents\[0\]\[0\] = inf"):
        check_latents([[float("inf"), 0.0]], 2, "latents")
    with pytest.raises(RequestError, match=r"within \+-100"):
        check_latents([[1e6, 0.0]], 2, "latents")
    with pytest.raises(RequestError, match=r"latents\[1\]\[0\] = -100.5: latent values must be"):
        check_latents([[0.0, 100.0], [-100.5, 0.0]], 2, "latents")


def test_check_latents_accepts_the_bounds_and_answers_float32():
    z = check_latents([[100.0, -100.0], [1, 2]], 2, "latents")  # JSON may give integers
    assert z.dtype == np.float32 and z.shape == (2, 2)
    np.testing.assert_array_equal(z, [[100.0, -100.0], [1.0, 2.0]])


def test_random_seeds_span_the_whole_seed_range(monkeypatch):
    import secrets

    bounds = []
    monkeypatch.setattr(secrets, "randbelow", lambda n: bounds.append(n) or n - 1)
    assert random_seed() == MAX_SEED == 2**32 - 1
    assert bounds == [2**32]
