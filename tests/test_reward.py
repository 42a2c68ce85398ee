"""The math-verify reward (TRAPO.md "Losses": 1 if the last \\boxed{} verifies against the reference, else 0).

Everything runs the real math-verify. Each behaviour is checked on the main thread (in-process, math-verify's
signal timeouts) and off it (worker process), since the two paths differ.
"""

import math
import os
import pickle
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trapo_lightning.reward import MathVerifyReward, RewardResult, Verdict, last_boxed, verdict_counts

# (completion, reference answer, verdict)
CASES = [
    ("47 + 38 = 85 and 85 - 19 = 66, so \\boxed{66}", "66", Verdict.correct),
    ("\\boxed{\\frac{1}{2}}", "0.5", Verdict.correct),  # same number, different form
    ("\\boxed{-7}", "-7", Verdict.correct),
    ("\\boxed{65}", "66", Verdict.wrong),
    ("The answer is 66.", "66", Verdict.unparseable),  # no \boxed at all
    ("so \\boxed{66", "66", Verdict.unparseable),  # never closed
    ("\\boxed{}", "66", Verdict.unparseable),  # nothing in it
    ("\\boxed{@@}", "66", Verdict.unparseable),  # math-verify finds no expression
    ("first \\boxed{65}, finally \\boxed{66}", "66", Verdict.correct),  # the last one wins...
    ("first \\boxed{66}, finally \\boxed{65}", "66", Verdict.wrong),  # ...either way
]
ADVERSARIAL = {
    "huge_power": "\\boxed{" + "9" * 5000 + "^" + "9" * 5000 + "}",
    "deep_nesting": "\\boxed{" + "{" * 3000 + "1" + "}" * 3000 + "}",
    "tower": "\\boxed{9^{9^{9^{9}}}}",
}
# Off the main thread the time includes restarting a worker killed by the previous timeout (about a second, far
# more on a loaded machine). On the main thread math-verify's limit applies per parse and per comparison.
MARGIN_S = 15.0


def _expected(verdict: Verdict) -> RewardResult:
    return RewardResult(verdict, 1.0 if verdict is Verdict.correct else 0.0)


def _off_main_thread(fn, *args):
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(fn, *args).result()


def _score_within_bound(reward, completion, on_main_thread):
    """Grade `completion` against 66 on the main thread or off it, asserting the time bound."""
    start = time.perf_counter()
    if on_main_thread:
        result = reward.score(completion, "66")
    else:
        result = _off_main_thread(reward.score, completion, "66")
    assert time.perf_counter() - start < reward.timeout_s + MARGIN_S
    return result


@pytest.fixture(scope="module")
def reward():
    reward = MathVerifyReward(timeout_s=5.0)
    yield reward
    reward.close()


@pytest.fixture(scope="module")
def fast_reward():
    reward = MathVerifyReward(timeout_s=1.0)
    yield reward
    reward.close()


@pytest.fixture(scope="module")
def in_process_reward():
    """isolate=False: main-thread checks run in-process under math-verify's own signal limits."""
    return MathVerifyReward(timeout_s=5.0, isolate=False)


@pytest.mark.parametrize(("completion", "answer", "verdict"), CASES)
def test_verdicts_on_main_thread(reward, in_process_reward, completion, answer, verdict):
    assert threading.current_thread() is threading.main_thread()
    assert reward.score(completion, answer) == _expected(verdict)  # in the worker
    assert in_process_reward.score(completion, answer) == _expected(verdict)
    assert in_process_reward._worker is None  # really in-process


def test_in_process_timeouts_are_counted_not_silent():
    # 3000 nested groups take math-verify about 40 s unbounded; its 1 s signal limits end it as a timeout.
    in_process = MathVerifyReward(timeout_s=1.0, isolate=False)
    assert in_process.score(ADVERSARIAL["deep_nesting"], "66") == _expected(Verdict.timeout)


def test_verdicts_off_main_thread(reward):
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda case: reward.score(case[0], case[1]), CASES))
    assert results == [_expected(verdict) for _, _, verdict in CASES]


def test_plain_thread(reward):
    results = []
    thread = threading.Thread(target=lambda: results.append(reward(["so \\boxed{66}"], ["66"])))
    thread.start()
    thread.join()
    assert results == [[_expected(Verdict.correct)]]


def test_call_scores_pairwise_and_counts_every_verdict(reward):
    completions = [completion for completion, _, _ in CASES]
    answers = [answer for _, answer, _ in CASES]
    results = reward(completions, answers)
    assert results == [_expected(verdict) for _, _, verdict in CASES]
    # CASES: 4 correct, 2 wrong, 4 unparseable, and a key for timeout even though none happened
    assert verdict_counts(results) == {"correct": 4, "wrong": 2, "unparseable": 4, "timeout": 0}


def test_verdict_counts_of_nothing():
    assert verdict_counts([]) == {verdict.value: 0 for verdict in Verdict}
    assert [verdict.value for verdict in Verdict] == ["correct", "wrong", "unparseable", "timeout"]


def test_call_rejects_unequal_lengths(reward):
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        reward(["\\boxed{1}", "\\boxed{2}"], ["1"])


@pytest.mark.parametrize("completion", ["\\boxed{66}", "no boxed answer"])
def test_unparseable_reference_is_bad_data(reward, completion):
    # The reference is checked even when the completion has no answer, so bad data cannot hide.
    with pytest.raises(ValueError, match="@@"):
        reward.score(completion, "@@")
    with pytest.raises(ValueError, match="@@"):
        _off_main_thread(reward.score, completion, "@@")


@pytest.mark.parametrize(
    "kwargs",
    [{"timeout_s": 0}, {"timeout_s": -1.0}, {"timeout_s": math.nan}, {"timeout_s": math.inf}, {"timeout_s": "5"},
     {"max_completion_chars": 0}, {"max_completion_chars": 1.5}],
)
def test_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        MathVerifyReward(**kwargs)


@pytest.mark.parametrize(
    ("text", "content"),
    [
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces
        ("\\boxed{\\frac{\\sqrt{2}}{2}} done.", "\\frac{\\sqrt{2}}{2}"),
        ("a \\boxed{1} b \\boxed{2} c", "2"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces are content, not nesting
        ("\\boxed {3}", "3"),
        ("\\boxed{}", ""),
        ("\\boxed{a}}}", "a"),
        ("\\boxed{1} and then \\boxed{2", None),  # the final answer is unfinished
        ("\\boxed{1} \\boxed", None),  # likewise
        ("no answer", None),
        ("", None),
    ],
)
def test_last_boxed(text, content):
    assert last_boxed(text) == content


@pytest.mark.parametrize(
    "text",
    ["x{\\}" * 250_000, "\\boxed{" * 150_000, "\\boxed{" + "{" * 1_000_000, "\\" * 1_000_000],
    ids=["garbage", "many_openings", "unclosed", "backslashes"],
)
def test_last_boxed_is_linear_on_a_megabyte(text):
    start = time.perf_counter()
    assert last_boxed(text) is None
    assert time.perf_counter() - start < 5.0  # about 0.2 s; a quadratic scan would take hours


def test_only_the_tail_is_searched():
    reward = MathVerifyReward(max_completion_chars=100)
    # 1 MB of work before the answer stays fast; an answer that starts before the last 100 characters is cut.
    assert reward.score("x" * 1_000_000 + "\\boxed{66}", "66") == _expected(Verdict.correct)
    assert reward.score("\\boxed{66}" + "." * 100, "66") == _expected(Verdict.unparseable)


@pytest.mark.parametrize("on_main_thread", [True, False], ids=["main_thread", "off_main_thread"])
@pytest.mark.parametrize("completion", ADVERSARIAL.values(), ids=ADVERSARIAL.keys())
def test_adversarial_input_returns_in_bounded_time(fast_reward, completion, on_main_thread):
    result = _score_within_bound(fast_reward, completion, on_main_thread)
    # Which verdict depends on the machine's speed, but none of these is 66.
    assert isinstance(result.verdict, Verdict)
    assert result.reward == 0.0
    # The worker, killed if it was late, is replaced for the next check.
    assert _off_main_thread(fast_reward.score, "\\boxed{66}", "66") == _expected(Verdict.correct)


def test_timeout_is_counted_not_silent(fast_reward):
    # 3000 nested groups take math-verify about 40 s unbounded (2-core dev box): far past the 1 s limit.
    completion = ADVERSARIAL["deep_nesting"]
    for result in (fast_reward.score(completion, "66"), _off_main_thread(fast_reward.score, completion, "66")):
        assert result == _expected(Verdict.timeout)
        assert verdict_counts([result])["timeout"] == 1


_TEXT = st.one_of(
    st.text(max_size=200),
    st.builds(
        lambda prefix, body: f"{prefix}\\boxed{{{body}}}",
        st.text(max_size=40),
        st.text(alphabet="0123456789+-*/^{}()[]\\ fracsqrtpix,.=", max_size=40),
    ),
)


@settings(max_examples=30, deadline=None)
@given(completion=_TEXT)
def test_any_text_gets_a_verdict(reward, completion):
    result = reward.score(completion, "66")
    assert isinstance(result, RewardResult)
    assert result.reward == (1.0 if result.verdict is Verdict.correct else 0.0)
    off_main = _off_main_thread(reward.score, completion, "66")
    if Verdict.timeout not in (result.verdict, off_main.verdict):
        assert off_main == result


_HOSTILE = st.one_of(
    st.integers(1, 20_000).map(lambda n: f"\\boxed{{{'9' * n}}}"),  # huge numbers
    st.integers(1, 4_000).map(lambda n: "\\boxed{" + "{" * n + "1" + "}" * n + "}"),  # deep nesting
    st.integers(1, 6).map(lambda n: "\\boxed{" + "9^{" * n + "9" + "}" * n + "}"),  # power towers
    st.text(alphabet="{}\\", min_size=1, max_size=2_000).map(lambda t: "\\boxed{" + t),  # unbalanced braces
    st.builds(lambda t, n: t * n, st.text(min_size=1, max_size=50), st.integers(200, 2_000)),  # long garbage
    st.builds("".join, st.lists(st.sampled_from(["\\frac{", "\\sqrt{", "}", "^", "\\boxed{", "1", "x"]),
                                min_size=1, max_size=3_000)),
)


@settings(max_examples=10, deadline=None)
@given(completion=_HOSTILE, on_main_thread=st.booleans())
def test_hostile_text_never_raises_and_stays_within_the_bound(fast_reward, completion, on_main_thread):
    result = _score_within_bound(fast_reward, completion, on_main_thread)
    assert isinstance(result.verdict, Verdict) and result.reward == (result.verdict is Verdict.correct)


def test_pickled_copy_starts_its_own_worker(reward):
    # ddp_spawn and deepcopy pickle the module and its reward; a process and a lock do not pickle.
    copy = pickle.loads(pickle.dumps(reward))
    assert copy.timeout_s == reward.timeout_s
    assert _off_main_thread(copy.score, "\\boxed{66}", "66") == _expected(Verdict.correct)
    copy.close()


def test_worker_does_not_rerun_an_unguarded_main_script(tmp_path):
    # A multiprocessing 'spawn' worker would re-run this script (no __main__ guard) and fail to start.
    script = tmp_path / "score.py"
    script.write_text(
        "from concurrent.futures import ThreadPoolExecutor\n"
        "from trapo_lightning.reward import MathVerifyReward\n"
        "print('script ran', flush=True)\n"
        "with ThreadPoolExecutor(1) as pool:\n"
        "    print(pool.submit(MathVerifyReward().score, '\\\\boxed{66}', '66').result().verdict.value)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["script", "ran", "correct"]


# -- the reference's parse alone, for data sources to check answers when they load them (issue 15) --------------------
@pytest.mark.parametrize("on_main_thread", [True, False], ids=["in-process", "worker"])
def test_reference_problem_is_the_parse_that_score_raises_on(on_main_thread):
    reward = MathVerifyReward(timeout_s=1.0, isolate=False)  # off the main thread it uses the worker anyway
    problem = reward.reference_problem if on_main_thread else lambda a: _off_main_thread(reward.reference_problem, a)
    try:
        assert problem("66") is None and problem("\\frac{1}{2}") is None
        unparseable = "math-verify cannot parse it or finds no expression in it (read inside \\boxed{})"
        assert problem("\\frac{1}{") == unparseable
        with pytest.raises(ValueError, match="cannot parse the reference answer"):
            reward.score("\\boxed{1}", "\\frac{1}{")
        if not on_main_thread:  # in-process, the time limit is tested through the data layer (test_sources.py)
            assert problem("{" * 3000 + "1" + "}" * 3000) == "math-verify did not parse it within 1 s"
    finally:
        reward.close()
