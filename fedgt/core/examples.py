"""The unit of data: an example is a context (no loss) followed by a target (trained on)."""

from __future__ import annotations

from dataclasses import dataclass

PROMPT_TEMPLATE = "Q: {prompt}\nA: "
END_OF_ANSWER = "\n"


@dataclass(frozen=True)
class Example:
    """``context`` conditions the model, ``target`` is what it learns to produce.

    Task examples (``is_task``) have an exact-match answer: ``target`` without its closing newline.
    Free-text examples have an empty context and are trained on every token.
    """

    context: str
    target: str
    is_task: bool

    @property
    def answer(self) -> str:
        """The exact-match answer of a task example."""
        if not self.is_task:
            raise ValueError("free-text examples have no exact-match answer")
        return self.target[: -len(END_OF_ANSWER)]

    @property
    def text(self) -> str:
        """The full training string."""
        return self.context + self.target


def task_example(prompt: str, answer: str) -> Example:
    """A question/answer example in the fixed ``Q: ...\\nA: ...\\n`` layout."""
    if END_OF_ANSWER in answer:
        raise ValueError(f"an answer may not contain a newline: {answer!r}")
    return Example(PROMPT_TEMPLATE.format(prompt=prompt), answer + END_OF_ANSWER, True)


def text_example(text: str) -> Example:
    """A free-text example trained on every character."""
    return Example("", text if text.endswith("\n") else text + "\n", False)


def prompt_of(ex: Example) -> str:
    """What a public example asks a model: a task's context, or the first half (in words) of a free text."""
    if ex.is_task:
        return ex.context
    words = ex.target.split()
    return " ".join(words[: max(1, len(words) // 2)])
