"""`iter_full_tensors`: size-capped buckets of full tensors with checkpoint names, from a plain module and from an
FSDP2-sharded one (DTensor parameters on a 1-process gloo mesh), gathered lazily bucket by bucket."""

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from helpers import one_torch_thread, tiny_qwen2  # noqa: F401 (autouse fixture)
from trapo_lightning.weights import checkpoint_name, iter_full_tensors


class Sized(torch.nn.Module):
    """float32 parameters of 40, 40, 100 and 8 bytes, and `d` tied to a second name."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.arange(10.0))
        self.b = torch.nn.Parameter(torch.arange(10.0) + 10)
        self.c = torch.nn.Parameter(torch.arange(25.0) + 20)
        self.d = torch.nn.Parameter(torch.arange(2.0) + 45)
        self.tied = self.d


def names(buckets):
    return [[name for name, _ in bucket] for bucket in buckets]


def test_buckets_hold_at_most_the_cap_and_an_oversized_tensor_goes_alone():
    # cap 96 B: a + b = 80 B fit; c (100 B) would make 180 and is over the cap even alone, so it goes alone;
    # d (8 B) after c would make 108 > 96, so it starts the last bucket. The tied name is not sent twice.
    buckets = list(iter_full_tensors(Sized(), bucket_bytes=96))
    assert names(buckets) == [["a", "b"], ["c"], ["d"]]


def test_one_bucket_when_everything_fits_and_one_tensor_per_bucket_at_one_byte():
    assert names(iter_full_tensors(Sized(), bucket_bytes=10**6)) == [["a", "b", "c", "d"]]
    assert names(iter_full_tensors(Sized(), bucket_bytes=1)) == [["a"], ["b"], ["c"], ["d"]]


def test_plain_tensors_are_the_parameters_values_without_a_copy_or_autograd():
    module = Sized()
    streamed = dict(pair for bucket in iter_full_tensors(module, 96) for pair in bucket)
    for name, param in module.named_parameters():
        tensor = streamed[name]
        assert tensor.data_ptr() == param.data_ptr() and torch.equal(tensor, param)
        assert not tensor.requires_grad


def test_rejects_a_non_positive_cap():
    with pytest.raises(ValueError, match="bucket_bytes"):
        next(iter_full_tensors(Sized(), 0))


def test_checkpoint_names_drop_activation_checkpointing_and_compile_wrappers():
    assert checkpoint_name("model.layers.0._checkpoint_wrapped_module.mlp.up_proj.weight") == (
        "model.layers.0.mlp.up_proj.weight"
    )
    assert checkpoint_name("_orig_mod.lm_head.weight") == "lm_head.weight"
    assert checkpoint_name("model.norm.weight") == "model.norm.weight"


@pytest.fixture
def gloo_mesh():
    """A 1-process gloo process group and CPU device mesh, torn down after the test."""
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_fsdp2_sharded_policy_streams_full_tensors_with_hf_names_one_bucket_at_a_time(
    gloo_mesh, tmp_path, monkeypatch
):
    from torch.distributed.fsdp import fully_shard

    source = tiny_qwen2(tmp_path / "model")
    expected = {k: v.clone() for k, v in source.load_model().named_parameters()}
    policy = source.load_model()
    for layer in policy.model.layers:
        fully_shard(layer, mesh=gloo_mesh)
    fully_shard(policy, mesh=gloo_mesh)
    assert all(isinstance(p, DTensor) for p in policy.parameters())

    gathered = []
    real_full_tensor = DTensor.full_tensor

    def counting_full_tensor(self, *args, **kwargs):
        gathered.append(self)
        return real_full_tensor(self, *args, **kwargs)

    monkeypatch.setattr(DTensor, "full_tensor", counting_full_tensor)
    bucket_bytes = 8 * 1024  # the tiny model's 30k float32 parameters (~120 KB) make many buckets
    streamed = {}
    buckets = iter_full_tensors(policy, bucket_bytes)
    for count, bucket in enumerate(buckets, start=1):
        # lazily: only the tensors of the buckets handed out so far have been gathered
        assert len(gathered) == len(streamed) + len(bucket)
        size = sum(t.numel() * t.element_size() for _, t in bucket)
        assert size <= bucket_bytes or len(bucket) == 1
        for name, tensor in bucket:
            assert not isinstance(tensor, DTensor)
            streamed[name] = tensor
    assert count > 5
    assert list(streamed) == list(expected)  # the Hugging Face names, in order (the tied lm_head once)
    for name, tensor in streamed.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=name)
