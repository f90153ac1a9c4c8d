"""NCA (Goldberger et al. 2004; Wu et al. 2018 memory-bank form): LOOK with k = every memory row."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from look.methods.base import check_options
from look.methods.look import LOOK, LOOKOptions


@dataclass
class NCAOptions(LOOKOptions):
    k: int | None = None
    # A sharded bank needs a finite k (LOOKOptions.validate says so): not one of NCA's memories.
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        **LOOKOptions.CHOICES,
        "memory": ("bank", "queue"),
    }
    # Options of LOOK's that NCA inherits but may not set (`look methods` says so).
    FIXED: ClassVar[dict[str, str]] = {
        "k": "nca uses every memory row",
        "k_fraction": "nca uses every memory row",
    }

    def validate(self) -> None:
        check_options(self.k is None, f"nca uses every memory row; k must be null, got {self.k}")
        check_options(self.k_fraction is None, "nca uses every memory row; k_fraction must be null")
        super().validate()


class NCA(LOOK):
    name = "nca"
    Options = NCAOptions
