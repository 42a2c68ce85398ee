"""Schedule and controller update rules, with the arithmetic done by hand in the comments."""

import math

import pytest

from trapo_lightning.schedules import ScheduleShape, adaptive_alpha, adaptive_kl_coef, scheduled_value


def test_constant_ignores_the_step():
    assert scheduled_value(0, 0.1, 0.5, 10, ScheduleShape.constant) == 0.1
    assert scheduled_value(99, 0.1, 0.5, 10, "constant") == 0.1


def test_linear_interpolates_then_holds():
    # 0.1 + (0.5 - 0.1) * 5/10 = 0.3; at and after step 10: 0.5
    assert scheduled_value(5, 0.1, 0.5, 10, ScheduleShape.linear) == pytest.approx(0.3)
    assert scheduled_value(0, 0.1, 0.5, 10, "linear") == 0.1
    assert scheduled_value(10, 0.1, 0.5, 10, "linear") == 0.5
    assert scheduled_value(50, 0.1, 0.5, 10, "linear") == 0.5


def test_cosine_anneals_like_uft():
    # UFT: 0.95 -> 0.05. Halfway: 0.05 + 0.9 * 0.5 * (1 + cos(pi/2)) = 0.05 + 0.45 = 0.5
    assert scheduled_value(50, 0.95, 0.05, 100, ScheduleShape.cosine) == pytest.approx(0.5)
    # a quarter: 0.05 + 0.9 * 0.5 * (1 + cos(pi/4)) = 0.05 + 0.45 * 1.70711 = 0.81820
    assert scheduled_value(25, 0.95, 0.05, 100, "cosine") == pytest.approx(0.05 + 0.45 * (1 + math.sqrt(0.5)))
    assert scheduled_value(0, 0.95, 0.05, 100, "cosine") == pytest.approx(0.95)
    assert scheduled_value(100, 0.95, 0.05, 100, "cosine") == 0.05


def test_zero_length_schedule_is_the_end_value():
    assert scheduled_value(0, 1.0, 0.0, 0, "linear") == 0.0


def test_kl_controller_grows_shrinks_and_clips():
    # kl 0.11 vs target 0.1: error = 0.1, horizon 10 -> coef * (1 + 0.01)
    assert adaptive_kl_coef(0.2, 0.11, 0.1, horizon=10) == pytest.approx(0.2 * 1.01)
    # kl 0.05: error = -0.5 clipped to -0.2 -> 0.2 * (1 - 0.02) = 0.196
    assert adaptive_kl_coef(0.2, 0.05, 0.1, horizon=10) == pytest.approx(0.196)
    # kl 1.0: error 9 clipped to 0.2; 4 steps at horizon 8 -> 0.2 * (1 + 0.2 * 0.5) = 0.22
    assert adaptive_kl_coef(0.2, 1.0, 0.1, horizon=8, steps=4) == pytest.approx(0.22)
    assert adaptive_kl_coef(0.2, 0.1, 0.1, horizon=10) == pytest.approx(0.2)  # on target: unchanged


def test_alpha_controller_moves_against_the_error_within_bounds():
    # 30% outside vs target 10%: error 0.2 -> alpha * exp(-1 * 0.2) = 0.1 * 0.81873
    assert adaptive_alpha(0.1, 0.3, 0.1, gain=1.0, low=0.001, high=0.5) == pytest.approx(0.1 * math.exp(-0.2))
    # 0% outside vs 10%: error -0.1 -> 0.1 * exp(0.1) = 0.11052
    assert adaptive_alpha(0.1, 0.0, 0.1, gain=1.0, low=0.001, high=0.5) == pytest.approx(0.1 * math.exp(0.1))
    # error 0.9 clips to 0.2; gain 50 -> 0.1 * exp(-10) = 4.5e-6, held at the lower bound 0.001
    assert adaptive_alpha(0.1, 1.0, 0.1, gain=50.0, low=0.001, high=0.5) == 0.001
    assert adaptive_alpha(0.4, 0.0, 0.1, gain=50.0, low=0.001, high=0.5) == 0.5


@pytest.mark.parametrize("call", [
    lambda: adaptive_kl_coef(0.1, 0.1, 0.0, 10),
    lambda: adaptive_kl_coef(0.1, 0.1, 0.1, 0),
    lambda: adaptive_alpha(0.1, 0.1, 0.1, 1.0, 0.0, 0.5),
    lambda: adaptive_alpha(0.1, 0.1, 0.1, 1.0, 0.6, 0.5),
    lambda: scheduled_value(0, 0.0, 1.0, -1, "linear"),
])
def test_bad_arguments_are_rejected(call):
    with pytest.raises(ValueError):
        call()
