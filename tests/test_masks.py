"""Expert-prefix / policy token masks (TRAPO.md: a shared prefix gets the SFT loss once)."""

import pytest
import torch

from trapo_lightning.masks import ResponseMasks, prefix_loss_carriers, response_masks


def test_first_guided_sample_of_each_prompt_and_micro_group_carries_the_prefix_loss():
    # position:            0  1  2  3  4  5  6
    prompt = torch.tensor([1, 0, 1, 0, 1, 0, 2])
    micro_group = torch.tensor([1, 1, 1, 1, 2, 1, 3])
    prefix_len = torch.tensor([5, 0, 5, 3, 0, 3, 9])
    # (1, 1): positions 0 and 2 guided -> 0 carries
    # (0, 1): position 1 unguided, positions 3 and 5 guided -> 3 carries (first *guided*, input unsorted)
    # (1, 2): position 4 unguided -> nobody
    # (2, 3): position 6 alone -> carries
    expected = torch.tensor([True, False, False, True, False, False, True])
    carriers = prefix_loss_carriers(prompt, micro_group, prefix_len)
    assert carriers.dtype == torch.bool
    assert torch.equal(carriers, expected)


def test_carriers_do_not_depend_on_order_beyond_the_first_position():
    # the same pairs reversed: now the highest original position of each pair comes first
    prompt = torch.tensor([2, 0, 1, 0, 1, 0, 1])
    micro_group = torch.tensor([3, 1, 2, 1, 1, 1, 1])
    prefix_len = torch.tensor([9, 3, 0, 3, 5, 0, 5])
    # (2, 3) -> 0; (0, 1): 1 guided first -> 1; (1, 2) unguided; (1, 1): 4 first -> 4
    expected = torch.tensor([True, True, False, False, True, False, False])
    assert torch.equal(prefix_loss_carriers(prompt, micro_group, prefix_len), expected)


def test_empty_batch():
    empty = torch.zeros(0, dtype=torch.long)
    assert prefix_loss_carriers(empty, empty, empty).shape == (0,)


def test_carriers_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes differ"):
        prefix_loss_carriers(torch.zeros(3, dtype=torch.long), torch.zeros(2, dtype=torch.long), torch.zeros(3))


def test_response_masks_by_hand():
    prefix_len = torch.tensor([2, 2, 0, 3])
    response_len = torch.tensor([4, 3, 2, 3])
    carries = torch.tensor([True, False, False, True])
    masks = response_masks(prefix_len, response_len, carries, width=5)
    assert isinstance(masks, ResponseMasks)
    # expert: carries and t < prefix_len
    expected_expert = torch.tensor(
        [
            [1, 1, 0, 0, 0],  # carrier, prefix 2
            [0, 0, 0, 0, 0],  # shares a prefix carried elsewhere
            [0, 0, 0, 0, 0],  # unguided
            [1, 1, 1, 0, 0],  # carrier, prefix 3 = whole response (ratio 1.0)
        ],
        dtype=torch.bool,
    )
    # policy: prefix_len <= t < response_len
    expected_policy = torch.tensor(
        [
            [0, 0, 1, 1, 0],  # t in [2, 4)
            [0, 0, 1, 0, 0],  # t in [2, 3)
            [1, 1, 0, 0, 0],  # t in [0, 2)
            [0, 0, 0, 0, 0],  # [3, 3): no policy tokens
        ],
        dtype=torch.bool,
    )
    assert torch.equal(masks.expert, expected_expert)
    assert torch.equal(masks.policy, expected_policy)
    assert not (masks.expert & masks.policy).any()


@pytest.mark.parametrize(
    ("prefix_len", "response_len", "width"),
    [([3], [2], 5), ([1], [6], 5), ([-1], [2], 5)],
)
def test_response_masks_validate_lengths(prefix_len, response_len, width):
    with pytest.raises(ValueError, match="prefix_len <= response_len <= width"):
        response_masks(torch.tensor(prefix_len), torch.tensor(response_len), torch.tensor([True]), width)
