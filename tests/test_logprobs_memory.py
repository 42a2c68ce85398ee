"""Peak memory of `token_logprobs_and_entropy` (issue 6): the float32 work is bounded by one chunk, not [B, T, V].

How it is measured: torch's CPU allocator reports every allocation and free to the profiler when
`profile_memory=True`; replaying those events in time order gives the peak of bytes allocated inside the block
above what was live before it (tracemalloc would not see them: they bypass Python's allocator). RSS would be
blurred by glibc's caching of freed pages. The logits themselves exist before the call and are not counted.

What the numbers say, V = 2048, B = 2, chunk 128 rows (float32 [B, T, V] is 4 MB at T = 256, 16.8 MB at T = 1024):
- forward, kept for backward: ours ~3.2 MB at both lengths (three [chunk, V] float32 temporaries, freed chunk
  by chunk, plus [B, T] outputs); log_softmax + gather keeps 3 x float32 [B, T, V] (12.6 MB, 50.4 MB).
- forward + backward at T = 1024: ours peaks at 2 x the logits' bytes (their gradient, in their dtype, plus one more
  full-size buffer in which autograd sums the per-chunk gradients of the row slices) + chunk temporaries: 34.7 MB
  for float32 logits, 17.4 MB for bf16 ones (~1 x float32 [B, T, V]). That is the gradient of materialised
  logits, not a float32 copy of them; the naive path peaks at 67.1 MB (float32) and 100.7 MB (bf16).
"""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from helpers import one_torch_thread  # noqa: F401 (autouse fixture)
from trapo_lightning.logprobs import token_entropy, token_logprobs, token_logprobs_and_entropy

B, V, CHUNK = 2, 2048, 128
CHUNK_F32 = CHUNK * V * 4  # bytes of one float32 [chunk, V] temporary


def peak_allocated_bytes(fn) -> int:
    """Peak of bytes allocated by torch on CPU while `fn` runs, relative to the start."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()  # negative for frees
        peak = max(peak, live)
    return peak


def ours(logits, targets):
    return token_logprobs_and_entropy(logits, targets, chunk_size=CHUNK)


def naive(logits, targets):
    return token_logprobs(logits, targets), token_entropy(logits)


def peaks(fn, length: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(peak of the forward alone, peak of forward + backward, bytes of the logits)."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(B, length, V, generator=generator).to(dtype).requires_grad_(True)  # [B, T, V]
    targets = torch.randint(0, V, (B, length), generator=generator)  # [B, T]

    def forward():
        return fn(logits, targets)

    def forward_and_backward():
        logprobs, entropy = forward()
        (logprobs.sum() + entropy.sum()).backward()

    forward_peak = peak_allocated_bytes(forward)
    return forward_peak, peak_allocated_bytes(forward_and_backward), logits.numel() * logits.element_size()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_memory_is_bounded_by_the_chunk_not_by_the_response_length(dtype):
    short, _, _ = peaks(ours, 256, dtype)
    long, _, _ = peaks(ours, 1024, dtype)
    # 4x the tokens: the chunk temporaries stay the same, only the [B, T] outputs grow (8 bytes x 2 x 768 = 12 kB)
    assert long - short < 0.1 * CHUNK_F32
    # float32 chunk copy (bf16 input only), log-probs, their exp, and the product summed into the entropy
    assert long < 5 * CHUNK_F32
    naive_long, _, _ = peaks(naive, 1024, dtype)
    assert naive_long >= 3 * B * 1024 * V * 4  # log_softmax & co. kept in float32 for backward


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_memory_is_the_logits_gradient_not_a_float32_copy(dtype):
    _, total, logits_bytes = peaks(ours, 1024, dtype)
    float32_btv = B * 1024 * V * 4
    # gradient of the logits + the buffer autograd sums the chunk-slice gradients in, both in the logits' dtype
    assert total <= 2 * logits_bytes + 5 * CHUNK_F32
    _, naive_total, _ = peaks(naive, 1024, dtype)
    assert naive_total >= 4 * float32_btv  # measured: 4.0x (float32 logits), 6.0x (bf16 logits)
    if dtype == torch.bfloat16:
        assert total < 1.2 * float32_btv
