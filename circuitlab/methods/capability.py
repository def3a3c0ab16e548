"""A capability probe that needs no download: two-digit arithmetic questions the project generates from
a seed, answered by greedy generation and scored as exact-match accuracy.

Why: an edit's first-token KL on harmless prompts says how far the next-token distribution moved, not
whether the model can still do a task (issue 26, "side effects beyond first-token KL"; Arditi et al.
2024, "Refusal in Language Models Is Mediated by a Single Direction", check their orthogonalized
models on capability benchmarks such as GSM8K for the same reason). Benchmarks need a download; this
one is written here, deterministic per seed:

- ``arithmetic_task(n, seed)``: ``n`` distinct questions "What is 37 + 48? Answer with the number
  only." — operands 10..99, addition or subtraction (larger operand first, so every answer is a
  non-negative integer), the first ``n`` of the 12,195 distinct questions in one seeded order (so a
  larger ``n`` only adds questions).
- ``parse_answer``: the first integer in a response (``"85."``, ``"The answer is 85"`` → 85).
- ``arithmetic_accuracy(model, n, seed)``: the fraction of questions whose greedy response's first
  integer equals the answer (exact match on the number). Decoding stops a row once its first integer
  has ended, which cannot change that integer.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Sequence

__all__ = ["ArithmeticItem", "TEMPLATE", "arithmetic_task", "parse_answer", "arithmetic_accuracy"]

TEMPLATE = "What is {a} {op} {b}? Answer with the number only."
_LOW, _HIGH = 10, 99  # two-digit operands
_NUMBER = re.compile(r"-?\d+")
_ENDED = re.compile(r"\d\D")  # a digit followed by a non-digit: the first integer is complete


@dataclass(frozen=True)
class ArithmeticItem:
    """One question and its answer."""

    a: int
    op: str
    b: int

    @property
    def prompt(self) -> str:
        return TEMPLATE.format(a=self.a, op=self.op, b=self.b)

    @property
    def answer(self) -> int:
        return self.a + self.b if self.op == "+" else self.a - self.b


def _questions() -> list[tuple[int, str, int]]:
    """Every distinct question: each ordered sum, each difference with the larger operand first."""
    r = range(_LOW, _HIGH + 1)
    return [(x, "+", y) for x in r for y in r] + [(x, "-", y) for x in r for y in r if x >= y]


def arithmetic_task(n: int, seed: int = 0) -> list[ArithmeticItem]:
    """``n`` distinct two-digit addition / subtraction questions, the same for the same seed."""
    questions = _questions()
    if not 1 <= n <= len(questions):
        raise ValueError(f"n={n} must be in 1..{len(questions)} (the distinct two-digit questions)")
    random.Random(seed).shuffle(questions)  # one seeded order: a larger n only adds questions
    return [ArithmeticItem(*q) for q in questions[:n]]


def parse_answer(text: str) -> int | None:
    """The first integer in ``text``, or None when it holds none."""
    found = _NUMBER.search(text)
    return int(found.group()) if found else None


def arithmetic_accuracy(model, n: int = 32, seed: int = 0, *, max_new_tokens: int = 8, batch_size: int = 16,
                        items: Sequence[ArithmeticItem] | None = None) -> float:
    """Exact-match accuracy of ``model``'s greedy answers to ``arithmetic_task(n, seed)`` (or ``items``)."""
    items = list(items) if items is not None else arithmetic_task(n, seed)
    texts = model.generate([i.prompt for i in items], max_new_tokens, batch_size=batch_size, share_prefix=True,
                           stop_when=lambda t: bool(_ENDED.search(t)))
    return sum(parse_answer(t) == i.answer for t, i in zip(texts, items)) / len(items)
