"""Rule-scorer throughput vs math-verify alone on a mixed, deterministic set of responses.

    python benchmarks/rewards.py [--n 10000] [--seed 0]

The mix mimics RLVR rollouts (spec §5): mostly multiple-choice, numeric and short-text answers
(right and wrong), some LaTeX that only the math-verify fallback can judge, some broken format.
The scorer should be faster than math-verify alone because most answers never reach the
symbolic fallback.
"""

from __future__ import annotations

import argparse
import collections
import random
import re
import time

from prism_megatron.rewards.response import extract_answer
from prism_megatron.rewards.verifiable import score_response

WORDS = ["yes", "no", "triangle", "circle", "red", "blue", "increase", "decrease", "parallel"]
UNITS = ["cm", "kg", "%", "°", "m²", "个", "元"]


def _wrap(answer: str, rng: random.Random) -> str:
    caption = "- a chart with axes\n- title: sales" if rng.random() < 0.5 else "a geometry figure"
    think = "Let me reason step by step. " * rng.randint(1, 20)
    return f"<caption>{caption}</caption>\n<think>{think}</think>\n<answer>{answer}</answer>"


def _mcq(rng: random.Random) -> tuple[str, str]:
    letter = rng.choice("ABCDE")
    guess = letter if rng.random() < 0.6 else rng.choice("ABCDE")
    form = rng.choice(["{}", "({})", "{}.", "The answer is {}", "Option ({})", "answer: {}"])
    truth = letter if rng.random() < 0.7 else f"({letter}) {rng.randint(1, 99)} cm"
    return form.format(guess), truth


def _numeric(rng: random.Random) -> tuple[str, str]:
    value = round(rng.uniform(-500, 500), rng.choice([0, 1, 2]))
    value = int(value) if value == int(value) else value
    guess = value if rng.random() < 0.6 else value + rng.choice([1, -2, 0.5, 10])
    unit = rng.choice(UNITS) if rng.random() < 0.3 else ""
    return f"{guess}{' ' if rng.random() < 0.5 else ''}{unit}".strip(), f"{value}"


def _text(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    guess = word if rng.random() < 0.6 else rng.choice(WORDS)
    return rng.choice([guess, guess.capitalize() + ".", f"**{guess}**"]), word


def _latex(rng: random.Random) -> tuple[str, str]:
    p, q = rng.randint(1, 9), rng.randint(2, 9)
    truth = f"{p / q:.6g}" if rng.random() < 0.5 else f"\\frac{{{p}}}{{{q}}}"
    k = rng.choice([1, 1, 2])
    guess = rng.choice([f"\\frac{{{p * k}}}{{{q * k}}}", f"{p * k}/{q * k}",
                        f"x = \\frac{{{p}}}{{{q}}}", f"\\sqrt{{{p}}}"])
    return guess, truth


def build_dataset(n: int, seed: int) -> list[tuple[str, str]]:
    """(response, ground truth) pairs: 40% MCQ, 25% numeric, 15% text, 10% LaTeX, 10% invalid."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.40:
            answer, truth = _mcq(rng)
        elif kind < 0.65:
            answer, truth = _numeric(rng)
        elif kind < 0.80:
            answer, truth = _text(rng)
        elif kind < 0.90:
            answer, truth = _latex(rng)
        else:  # broken format: truncated, missing caption, or trailing text
            answer, truth = _numeric(rng)
            response = _wrap(answer, rng)
            broken = rng.choice([response[: len(response) // 2], response.split("\n", 1)[1],
                                 response + " Hope this helps!"])
            pairs.append((broken, truth))
            continue
        pairs.append((_wrap(answer, rng), truth))
    return pairs


def _math_verify_alone(pairs: list[tuple[str, str]]) -> None:
    from math_verify import parse, verify

    for response, truth in pairs:
        answer = extract_answer(response) or response
        verify(parse(truth), parse(answer))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    pairs = build_dataset(args.n, args.seed)

    # Warm both paths up (imports, parser construction) outside the timed region.
    score_response(_wrap("\\frac{1}{2}", random.Random(0)), "0.5")
    _math_verify_alone(pairs[:20])

    start = time.perf_counter()
    results = [score_response(response, truth) for response, truth in pairs]
    scorer_s = time.perf_counter() - start
    start = time.perf_counter()
    _math_verify_alone(pairs)
    math_verify_s = time.perf_counter() - start

    reasons = collections.Counter(re.sub(r"^multi_value_part\d+_", "", r.reason) for r in results)
    scorer_rate, math_verify_rate = len(pairs) / scorer_s, len(pairs) / math_verify_s
    n = len(pairs)
    print(f"rule scorer:       {scorer_rate:9.0f} responses/s  ({n} responses, {scorer_s:.2f} s)")
    print(f"math-verify alone: {math_verify_rate:9.0f} responses/s  ({n} responses, "
          f"{math_verify_s:.2f} s)")
    print(f"ratio (scorer / math-verify): {scorer_rate / math_verify_rate:.1f}x")
    print("scorer reasons: " + ", ".join(f"{k}={v}" for k, v in reasons.most_common()))


if __name__ == "__main__":
    main()
