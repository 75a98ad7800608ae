"""Rule-based verifiable reward (spec §5): the §5.3 table, every §5.2 rule, timeouts, batching."""

import signal
import threading
import time

import pytest

from prism_megatron.rewards import symbolic
from prism_megatron.rewards.deadline import (
    DeadlineExceeded,
    SandboxError,
    call_with_deadline,
    shutdown_sandbox,
)
from prism_megatron.rewards.judge import (
    judge_answer,
    mcq_letter,
    normalize_text,
    parse_number,
    simple_parse,
    split_multi_value,
)
from prism_megatron.rewards.units import split_unit
from prism_megatron.rewards.verifiable import score_response, score_responses


def R(answer: str) -> str:
    """The spec's valid response R(a)."""
    return f"<caption>img</caption>\n<think>r</think>\n<answer>{answer}</answer>"


def accuracy(prediction: str, ground_truth: str, **kwargs) -> float:
    return score_response(R(prediction), ground_truth, **kwargs).accuracy


# ---------------------------------------------------------------------------- spec §5.3 table

TABLE = [
    (1, "<think>r</think><answer>A</answer>", "A", 0.0),
    (2, R("A") + " done", "A", 0.0),
    (3, R("  "), "3", 0.2),
    (4, R("x" * 1100), "3", 0.2),
    (5, R("A"), "A", 1.0),
    (6, R("a"), "A", 1.0),
    (7, R("(B)"), "B", 1.0),
    (8, R("The answer is C."), "C", 1.0),
    (9, R("The answer is B, not C (C)"), "C", 0.2),
    (10, R("Option (B)"), "B", 1.0),
    (11, R("A"), "(A) 12 cm", 1.0),
    (12, R("12 cm"), "(A) 12 cm", 0.2),
    (13, R("45°"), "B. 45°", 0.2),
    (14, R("b. triangle"), "B. Triangle", 1.0),
    (15, R("3.50"), "3.5", 1.0),
    (16, R("100.00001"), "100", 1.0),
    (17, R("100.001"), "100", 0.2),
    (18, R("0.0"), "0", 1.0),
    (19, R("12"), "12%", 1.0),
    (20, R("5 kg"), "5 cm", 1.0),
    (21, R("2 cm"), "2 m", 0.2),
    (22, R("1000"), "1,000", 0.2),
    (23, R("1,000"), "1,000", 1.0),
    (24, R("$\\dfrac{3}{4}$"), "\\frac{3}{4}", 1.0),
    (25, R("\\frac{1}{2}"), "0.5", 1.0),
    (26, R("x=3"), "3", 1.0),
    (27, R("(2, 3)"), "(2, 3)", 1.0),
    (28, R("(2,3)"), "(2, 3)", 0.2),
    (29, R("(1) 5; (2) 7"), "(1) 5 (2) 7", 1.0),
    (30, R("4; 3"), "3; 4", 0.2),
    (31, R("yes."), "Yes", 1.0),
    (32, R("\\frac{\\pi}{3}"), "60°", 0.2),
]
ROW_IDS = [f"row{row[0]}" for row in TABLE]


@pytest.mark.parametrize("row,response,ground_truth,score", TABLE, ids=ROW_IDS)
def test_spec_table(row, response, ground_truth, score):
    result = score_response(response, ground_truth)
    assert result.score == pytest.approx(score, abs=1e-12)
    assert result.accuracy == (1.0 if score == 1.0 else 0.0)
    assert result.format_ok == (score > 0)


def test_row25_needs_math_verify():
    result = score_response(R("\\frac{1}{2}"), "0.5", use_math_verify=False)
    assert (result.score, result.accuracy) == (pytest.approx(0.2), 0.0)


def test_weights_and_reasons():
    assert score_response(R("A"), "A", accuracy_weight=0.5, format_weight=0.5).score == 1.0
    assert score_response(R("B"), "A", accuracy_weight=0.5, format_weight=0.5).score == 0.5
    assert score_response(R("A") + "x", "A").reason == "format_invalid"
    assert score_response(R(""), "A").reason == "empty_answer"
    assert score_response(R("y" * 1024), "A").reason == "answer_too_long"  # >= 1024 chars
    assert score_response(R("y" * 1023), "y" * 1023).accuracy == 1.0
    assert score_response(R("7"), 7).accuracy == 1.0  # non-string ground truth


def test_first_answer_block_is_judged():
    text = "<caption>c</caption><think>t <answer>5</answer></think><answer>6</answer>"
    assert score_response(text, "5").accuracy == 1.0
    assert score_response(text, "6").accuracy == 0.0


# ---------------------------------------------------------------------------- rule pieces

@pytest.mark.parametrize("text,parts", [
    ("(1) 5; (2) 7", ["5", "7"]),
    ("(1) 5, (2) 7，", ["5", "7"]),
    ("a (1) x (2) y", ["x", "y"]),              # first marker within the first 3 chars
    ("abc (1) x (2) y", ["abc (1) x (2) y"]),   # marker too late, no ; or top-level comma
    ("(1) only", ["(1) only"]),
    ("1; 2；3", ["1", "2", "3"]),
    ("5;", ["5;"]),                              # one non-empty part: not a split
    ("1,000", ["1", "000"]),
    ("f(1, 2), [3, 4], {5, 6}", ["f(1, 2)", "[3, 4]", "{5, 6}"]),
    ("(2, 3)", ["(2, 3)"]),
    ("x", ["x"]),
])
def test_split_multi_value(text, parts):
    assert split_multi_value(text) == parts


@pytest.mark.parametrize("text,parsed", [
    ("  $$x+1$$ ", "x+1"),
    ("$ 3 $", "3"),
    ("\\(3\\)", "3"),
    ("\\[ 3 \\]", "3"),
    ("$\\(3\\)$", "3"),                          # each delimiter kind stripped once, in order
    ("\\dfrac{1}{2}", "\\frac{1}{2}"),
    ("\\tfrac{1}{2}", "\\frac{1}{2}"),
    ("5\\text{ cm}", "5 cm"),
    ("5\\mathrm{kg}", "5kg"),
    ("\\left( x \\right)", "( x )"),
    ("a \\leftarrow b", "a \\leftarrow b"),      # only the sizing commands are dropped
    ("\\frac{ 1 }{  2}", "\\frac{1}{2}"),
    ("1,234,567", "1234567"),
    ("(2,3)", "(23)"),
    ("1，000", "1000"),
    ("3.", "3"),
    ("3..", "3."),                               # only ONE trailing dot
    ("a   b\n c", "a b c"),
])
def test_simple_parse(text, parsed):
    assert simple_parse(text) == parsed


@pytest.mark.parametrize("text,number,unit", [
    ("12 cm", "12", "cm"), ("12cm²", "12", "cm²"), ("3 m²", "3", "m²"), ("36.5°C", "36.5", "°C"),
    ("45°", "45", "°"), ("50%", "50", "%"), ("7 Minutes", "7", "Minutes"), ("2 mL", "2", "mL"),
    ("3厘米", "3", "厘米"), ("5 米", "5", "米"), ("2千克", "2", "千克"), ("8个", "8", "个"),
    ("10元", "10", "元"), ("4 人", "4", "人"),
    ("2 m", "2 m", None),                        # bare m is not a unit
    ("cm", "cm", None),                          # a unit must follow a digit
    ("x cm", "x cm", None),
])
def test_split_unit(text, number, unit):
    assert split_unit(text) == (number, unit)


@pytest.mark.parametrize("text,value", [
    ("3.5", 3.5), ("-2", -2.0), ("1e3", 1000.0), ("1,234", 1234.0), ("12%", 12.0), ("5 kg", 5.0),
    ("3 个", 3.0), ("2 m", None), ("abc", None), ("1/2", None),
])
def test_parse_number(text, value):
    assert parse_number(text) == value


def test_normalize_text():
    assert normalize_text("**Hello**, World!") == "hello world"
    assert normalize_text("“是的”。") == "是的"
    assert normalize_text("(a) [b] {c}") == "a b c"


@pytest.mark.parametrize("prediction,letter", [
    ("C", "C"), ("c", "C"), ("(d)", "D"), ("[E]", "E"), ("B.", "B"), ("B:", "B"),
    ("The answer is C", "C"),
    ("answer: D", "D"),
    ("The correct choice is (E)", "E"),
    ("Option (B)", "B"),                         # "option" without is/: -> the (B) token
    ("(C) looks tempting but the answer is B", "B"),  # priority 10 beats 8 although later
    ("(B) or (C)", "B"),                         # equal priority: earliest wins
    ("A) no (B)", "B"),                          # " (X)" (8) beats " X)" (6)
    ("maybe A. or B.", "A"),
    ("The answer is B, not C (C)", "B"),         # spec row 9's MCQ parse
    ("Option C", None),
    ("The answer is Both", None),                # letter followed by letters is no letter
    ("12 cm", None),
])
def test_mcq_letter(prediction, letter):
    assert mcq_letter(prediction) == letter


@pytest.mark.parametrize("prediction,ground_truth,expected", [
    # MCQ ground truths
    ("B", "(B)", 1.0), ("(c)", "C. -3", 1.0), ("C", "C. (1, 2)", 1.0),
    ("the answer is c", "C", 0.0),               # phrase candidates need an upper-case letter
    ("A", "B", 0.0), ("-3", "C. -3", 0.0),       # MCQ never falls through to value checks
    ("C", "C. Circle", 0.0), ("c. circle", "C. Circle", 1.0),  # letter text: not MCQ, plain text
    # coordinates (final)
    ("(1.0000001, 2)", "(1, 2)", 1.0), ("(-1.5, +2)", "(-1.5, 2)", 1.0), ("(2, 1)", "(1, 2)", 0.0),
    ("The point is (1, 2)", "(1, 2)", 1.0), ("{(1, 2), (3, 4)}", "{(1, 2), (3, 4)}", 1.0),
    ("{(1, 2)}", "{(1, 2), (3, 4)}", 0.0),
    # numeric, units (incl. Chinese), tolerance
    ("1e3", "1000", 1.0), ("-0", "0", 1.0), ("3.5 cm", "3.5", 1.0), ("5个", "5", 1.0),
    ("3 厘米", "3", 1.0), ("2千克", "2 kg", 1.0), ("36.5°C", "36.5", 1.0), ("12 KG", "12", 1.0),
    ("0.999999", "1", 0.0), ("0.9999999", "1", 1.0), ("45°", "45", 1.0),
    # text: bold, punctuation, case
    ("**Yes**", "yes", 1.0), ("New York!", "new york", 1.0), ("“好”", "好", 1.0),
    ("3.5", "35", 1.0),                          # parity quirk: '.' is punctuation on the text path
    # unit-aware text
    ("1/2 cm", "1/2cm", 1.0), ("1/2 cm", "1/2 kg", 0.0), ("1/2 cm", "1/2", 0.0),
    # multi-value (order-sensitive, per-part judge)
    ("2; 3", "2; 3", 1.0), ("(1) 2 cm (2) 3", "(1) 2 (2) 3", 1.0), ("1, 2, 3", "1, 2", 0.0),
    ("1,234.5", "1234.5", 0.0),                  # parity: the comma splits like row 22
    # LaTeX normalisation
    ("$\\tfrac{1}{2}$", "\\frac{1}{2}", 1.0), ("\\left(1\\right)", "(1)", 1.0),
    ("\\text{blue}", "Blue", 1.0), ("\\[ 12 \\]", "12", 1.0),
    # math-verify fallback
    ("\\frac{6}{8}", "\\frac{3}{4}", 1.0), ("2/4", "0.5", 1.0), ("1.5", "\\frac{3}{2}", 1.0),
    ("\\boxed{3}", "3", 1.0), ("45^\\circ", "45", 1.0), ("x = 3", "3", 1.0),
    ("\\frac{1}{3}", "0.5", 0.0), ("x=4", "3", 0.0),
    ("12%", "0.12", 0.0),                        # unit present: fallback skipped (row 21 decision)
])
def test_rules(prediction, ground_truth, expected):
    assert accuracy(prediction, ground_truth) == expected


def test_boxed_unwrapping_is_opt_in():
    assert accuracy("\\boxed{A}", "A") == 0.0        # reference: MCQ parse sees no letter
    assert accuracy("\\boxed{A}", "A", unwrap_boxed=True) == 1.0
    assert accuracy("\\boxed{12 cm}", "12 cm", unwrap_boxed=True) == 1.0


def test_judge_answer_reasons():
    assert judge_answer("4; 3", "3; 4")[1].startswith("multi_value_part0")
    assert judge_answer("1000", "1,000") == (0.0, "multi_value_count_mismatch")
    assert judge_answer("(2, 3)", "(2, 3)") == (1.0, "coordinates")
    assert judge_answer("B", "A") == (0.0, "mcq_mismatch")


# ---------------------------------------------------------------------------- math-verify deadline

SLOW_RESPONSE = R("so $2^{2^{2^{30}}}$")  # sympy would spend minutes comparing this with 3


def _sleep_forever(prediction, ground_truth):
    time.sleep(60)
    return True


def test_timeout_main_thread_patched_verify(monkeypatch):
    monkeypatch.setattr(symbolic, "math_verify_equal", _sleep_forever)
    start = time.monotonic()
    result = score_response(R("\\frac{1}{2}"), "0.5", math_verify_timeout=0.2)
    elapsed = time.monotonic() - start
    assert elapsed < 2.0
    assert (result.score, result.accuracy, result.format_ok) == (pytest.approx(0.2), 0.0, True)
    assert "timeout" in result.reason


def test_timeout_main_thread_pathological_expression():
    score_response(R("\\frac{1}{2}"), "0.5")  # warm math-verify up outside the measurement
    start = time.monotonic()
    result = score_response(SLOW_RESPONSE, "3", math_verify_timeout=0.5)
    assert time.monotonic() - start < 3.0
    assert result.reason == "math_verify_timeout" and result.score == pytest.approx(0.2)


def test_timeout_from_a_worker_thread_uses_the_sandbox():
    results = {}

    def work():
        results["warm"] = score_response(R("\\frac{1}{2}"), "0.5")  # starts the sandbox
        start = time.monotonic()
        results["slow"] = score_response(SLOW_RESPONSE, "3", math_verify_timeout=0.5)
        results["elapsed"] = time.monotonic() - start
        results["after"] = score_response(R("\\frac{1}{2}"), "0.5")  # restarted sandbox

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive()
    assert results["warm"].accuracy == 1.0 and results["after"].accuracy == 1.0
    assert results["slow"].reason == "math_verify_timeout" and results["slow"].accuracy == 0.0
    assert results["elapsed"] < 3.0
    shutdown_sandbox()


def test_call_with_deadline_signal_restores_outer_timer():
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *_: fired.append(1))
    outer_before = signal.getitimer(signal.ITIMER_REAL)
    signal.setitimer(signal.ITIMER_REAL, 100.0)
    try:
        assert call_with_deadline(sum, ([1, 2],), timeout=1.0) == 3
        with pytest.raises(DeadlineExceeded):
            call_with_deadline(time.sleep, (10,), timeout=0.1, isolation="signal")
        remaining = signal.getitimer(signal.ITIMER_REAL)[0]
        assert 98.0 < remaining <= 100.0 and not fired
    finally:
        signal.signal(signal.SIGALRM, previous)
        signal.setitimer(signal.ITIMER_REAL, *outer_before)


def test_call_with_deadline_process_isolation():
    try:
        assert call_with_deadline(pow, (2, 10), timeout=30.0, isolation="process") == 1024
        start = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            call_with_deadline(time.sleep, (30,), timeout=0.3, isolation="process")
        assert time.monotonic() - start < 2.0
        with pytest.raises(SandboxError, match="ZeroDivisionError"):
            call_with_deadline(divmod, (1, 0), timeout=30.0, isolation="process")
    finally:
        shutdown_sandbox()
    with pytest.raises(ValueError):
        call_with_deadline(sum, ([],), timeout=0)


# ---------------------------------------------------------------------------- batched scoring

def test_score_responses_pool_matches_serial():
    responses = [row[1] for row in TABLE[:20]] + [R("\\frac{2}{4}"), "garbage"]
    truths = [row[2] for row in TABLE[:20]] + ["0.5", "A"]
    serial = score_responses(responses, truths)
    assert serial == [score_response(r, g) for r, g in zip(responses, truths)]
    pooled = score_responses(responses, truths, num_workers=2)
    assert pooled == serial
    with pytest.raises(ValueError):
        score_responses(["a"], [])
