"""The chaos table: one row per fault, and what recovered and lost mean."""

from __future__ import annotations

from dataclasses import dataclass

HEADER = "| fault | trials | recovered | data lost | note |\n|---|---|---|---|---|"


@dataclass
class Row:
    """`recovered`: trials after which re-running the same command (or nothing) left a correct result.
    `data_lost`: trials after which something already committed was lost or corrupted, or a
    half-written file, object, checkpoint or model version became visible or was loaded."""

    fault: str
    trials: int
    recovered: int
    data_lost: int
    note: str = ""

    def markdown(self) -> str:
        note = self.note.replace("|", "/").replace("\n", " ")
        return f"| {self.fault} | {self.trials} | {self.recovered} | {self.data_lost} | {note} |"


def table(rows: list[Row]) -> str:
    return "\n".join([HEADER, *(r.markdown() for r in rows)])
