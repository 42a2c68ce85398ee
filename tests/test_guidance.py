"""Micro-group guidance rule (TRAPO.md "Per-prompt sampling: micro-groups")."""

import dataclasses

import pytest
import torch
from jsonargparse import ArgumentParser

from trapo_lightning.guidance import (
    GuidanceRule,
    MicroGroup,
    MicroGroupGuidance,
    NoGuidance,
    micro_group_prefix_ratios,
)


def test_paper_defaults():
    rule = MicroGroupGuidance()
    assert rule.micro_groups == (
        MicroGroup(4, -1.0, 0.0),
        MicroGroup(2, 0.5, 0.25),
        MicroGroup(1, 0.7, 0.5),
        MicroGroup(1, 0.9, 1.0),
    )
    # 4 + 2 + 1 + 1 = 8
    assert rule.group_size == 8
    assert isinstance(rule, GuidanceRule)


def test_scripted_rewards_over_the_four_default_micro_groups():
    """Five prompts; each micro-group's decision from the mean reward of all earlier samples."""
    rule = MicroGroupGuidance()
    num_prompts = 5  # A, B, C, D, E

    # micro-group 0: no earlier samples, mean defined as 0.0, 0.0 < -1 is false -> nobody guided
    ratios = rule.prefix_ratios(0, torch.zeros(num_prompts, 0))
    torch.testing.assert_close(ratios, torch.zeros(5))
    rewards = torch.tensor(
        [
            [1.0, 1.0, 1.0, 1.0],  # A: 4/4 = 1.00
            [1.0, 0.0, 0.0, 0.0],  # B: 1/4 = 0.25
            [0.0, 0.0, 0.0, 0.0],  # C: 0/4 = 0.00
            [1.0, 1.0, 0.0, 0.0],  # D: 2/4 = 0.50
            [1.0, 1.0, 1.0, 0.0],  # E: 3/4 = 0.75
        ]
    )

    # micro-group 1, t = 0.5, L = 0.25: A 1.0 no; B 0.25 < 0.5 yes; C 0 yes; D 0.5 is not < 0.5, no; E 0.75 no
    ratios = rule.prefix_ratios(1, rewards)
    torch.testing.assert_close(ratios, torch.tensor([0.0, 0.25, 0.25, 0.0, 0.0]))
    # B's two guided rollouts both solve it, C's both fail; A, D, E unguided both right
    rewards = torch.cat([rewards, torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0]])], 1)

    # micro-group 2, t = 0.7, L = 0.5, over 6 samples:
    # A 6/6 = 1 no; B 3/6 = 0.5 yes; C 0/6 yes; D 4/6 = 0.667 < 0.7 yes (the reference code's integer form,
    # correct < 4, would not guide D); E 5/6 = 0.833 no
    ratios = rule.prefix_ratios(2, rewards)
    torch.testing.assert_close(ratios, torch.tensor([0.0, 0.5, 0.5, 0.5, 0.0]))
    rewards = torch.cat([rewards, torch.tensor([[1.0], [1.0], [0.0], [1.0], [1.0]])], 1)

    # micro-group 3, t = 0.9, L = 1.0 (the whole expert solution), over 7 samples:
    # A 7/7 = 1 no; B 4/7 = 0.571 yes; C 0/7 yes; D 5/7 = 0.714 yes; E 6/7 = 0.857 < 0.9 yes
    ratios = rule.prefix_ratios(3, rewards)
    torch.testing.assert_close(ratios, torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0]))
    assert ratios.dtype == torch.float32


def test_micro_group_prefix_ratios_with_no_prior_samples():
    # k = 0: mean is 0.0; 0.0 < 0.5 -> guided, 0.0 < -1 -> not, 0.0 < 0.0 -> not
    empty = torch.zeros(3, 0)
    torch.testing.assert_close(micro_group_prefix_ratios(empty, 0.5, 0.25), torch.full((3,), 0.25))
    torch.testing.assert_close(micro_group_prefix_ratios(empty, -1.0, 0.25), torch.zeros(3))
    torch.testing.assert_close(micro_group_prefix_ratios(empty, 0.0, 0.25), torch.zeros(3))


def test_micro_group_prefix_ratios_accepts_integer_rewards():
    # mean(1, 0) = 0.5 < 0.6 -> 0.5; mean(1, 1) = 1 -> 0
    ratios = micro_group_prefix_ratios(torch.tensor([[1, 0], [1, 1]]), 0.6, 0.5)
    assert ratios.dtype == torch.float32
    torch.testing.assert_close(ratios, torch.tensor([0.5, 0.0]))


def test_no_guidance_is_plain_grpo():
    rule = NoGuidance(group_size=6)
    assert rule.micro_groups == (MicroGroup(6, -1.0, 0.0),)
    assert rule.group_size == 6
    torch.testing.assert_close(rule.prefix_ratios(0, torch.zeros(3, 0)), torch.zeros(3))
    assert NoGuidance().group_size == 8


def test_prior_rewards_must_hold_exactly_the_earlier_samples():
    rule = MicroGroupGuidance()
    # micro-group 2 follows 4 + 2 = 6 samples
    with pytest.raises(ValueError, match="follows 6 samples"):
        rule.prefix_ratios(2, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="index"):
        rule.prefix_ratios(4, torch.zeros(2, 8))
    with pytest.raises(ValueError, match=r"\[P, k\]"):
        rule.prefix_ratios(0, torch.zeros(2))
    with pytest.raises(ValueError, match="follows 0 samples"):
        NoGuidance(4).prefix_ratios(0, torch.zeros(2, 4))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sizes": (4, 4), "thresholds": (-1.0,), "prefix_ratios": (0.0, 0.5)}, "one entry per micro-group"),
        ({"sizes": (), "thresholds": (), "prefix_ratios": ()}, "at least one"),
        ({"sizes": (4, 0), "thresholds": (-1.0, 0.5), "prefix_ratios": (0.0, 0.5)}, "size"),
        ({"sizes": (4, 4), "thresholds": (-1.0, 0.5), "prefix_ratios": (0.0, 1.5)}, "prefix ratio"),
    ],
)
def test_micro_group_guidance_validates_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MicroGroupGuidance(**kwargs)


def test_no_guidance_validates_group_size():
    with pytest.raises(ValueError, match="group_size"):
        NoGuidance(0)


def test_micro_group_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        MicroGroup(4, -1.0, 0.0).size = 2


def test_arguments_are_documented_for_the_cli_help():
    parser = ArgumentParser()
    parser.add_class_arguments(MicroGroupGuidance, "guidance")
    help_text = " ".join(parser.format_help().split())  # argparse wraps lines
    assert "rollouts per micro-group" in help_text
    assert "mean reward of all earlier samples" in help_text
    assert "fraction of the expert solution" in help_text


def test_the_count_rule_of_the_released_code():
    from trapo_lightning.guidance import CorrectCountGuidance

    rule = CorrectCountGuidance()
    four, six, seven = (torch.tensor([rows], dtype=torch.float32) for rows in (
        [1, 1, 0, 0], [1, 1, 0, 0, 1, 1], [1, 1, 0, 0, 1, 1, 1]))
    # after 4 samples, 2 correct: not < 2 -> unguided (mean 0.5 is not < 0.5 either: the rules agree)
    assert rule.prefix_ratios(1, four).tolist() == [0.0]
    # after 6, 4 correct: not < 4 -> unguided, where the paper's mean rule (4/6 = 0.667 < 0.7) guides at 0.5
    assert rule.prefix_ratios(2, six).tolist() == [0.0]
    assert MicroGroupGuidance().prefix_ratios(2, six).tolist() == [0.5]
    # after 7, 5 correct < 7 -> the whole solution
    assert rule.prefix_ratios(3, seven).tolist() == [1.0]
    # 1 of 4 correct < 2 -> 0.25
    assert rule.prefix_ratios(1, torch.tensor([[0.0, 1.0, 0.0, 0.0]])).tolist() == [0.25]
    assert rule.monotone_in_rewards and rule.group_size == 8


@pytest.mark.parametrize("min_correct", [(1, 2, 4, 7), (0, 5, 4, 7), (0, 2, 4, -1)])
def test_the_count_rule_refuses_counts_beyond_the_earlier_samples(min_correct):
    from trapo_lightning.guidance import CorrectCountGuidance

    with pytest.raises(ValueError, match="min_correct"):
        CorrectCountGuidance(min_correct=min_correct)
