"""Configuration errors that point at file:line:col and name the key."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an input, with where it is."""

    file: str
    message: str
    key: str = ""
    line: int | None = None  # 1-based
    col: int | None = None  # 1-based
    snippet: str = ""

    def one_line(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}"
            if self.col is not None:
                where += f":{self.col}"
        key = f" {self.key}:" if self.key else ""
        return f"{where}:{key} {self.message}"


class InputError(Exception):
    """Bad user input (config, data, model folder). The CLI maps it to exit code 2 before any compute."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(p.one_line() for p in problems))

    @classmethod
    def single(cls, file: str, message: str, key: str = "", line: int | None = None) -> "InputError":
        return cls([Problem(file=file, message=message, key=key, line=line)])
