"""The synthetic hospital's people: names, birth dates and sexes, and the deterministic UIDs
and random generators every generated thing is drawn from."""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass

import numpy as np

GIVEN = (
    "Ada",
    "Ben",
    "Cleo",
    "Dev",
    "Eva",
    "Finn",
    "Gia",
    "Hugo",
    "Ines",
    "Jon",
    "Kai",
    "Lena",
    "Milo",
    "Nora",
    "Omar",
    "Pia",
    "Rafi",
    "Sara",
    "Theo",
    "Uma",
    "Vera",
    "Wim",
)
FAMILY = (
    "Adler",
    "Berg",
    "Costa",
    "Dahl",
    "Ekström",
    "Fox",
    "Grün",
    "Haas",
    "Ito",
    "Jansen",
    "Kovac",
    "Lind",
    "Moreau",
    "Novak",
    "Olsen",
    "Petit",
    "Quinn",
    "Rossi",
    "Sato",
    "Tan",
)


@dataclass(frozen=True)
class Person:
    index: int
    patient_id: str
    name: str
    birth_date: str
    sex: str


def uid_for(seed: int, *parts: object) -> str:
    """A deterministic UID under the 2.25 (UUID-derived) root, at most 64 characters."""
    digest = hashlib.sha256("/".join(map(str, (seed, *parts))).encode()).hexdigest()
    return f"2.25.{int(digest[:30], 16)}"


def rng_for(seed: int, *parts: object) -> np.random.Generator:
    digest = hashlib.sha256("/".join(map(str, (seed, *parts))).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def people(seed: int, count: int) -> list[Person]:
    rng = rng_for(seed, "people")
    result = []
    for i in range(count):
        sex = "F" if rng.random() < 0.5 else "M"
        birth = dt.date(1935, 1, 1) + dt.timedelta(days=int(rng.integers(0, 365 * 70)))
        name = f"{FAMILY[int(rng.integers(len(FAMILY)))]}^{GIVEN[int(rng.integers(len(GIVEN)))]}"
        result.append(Person(i, f"SYN{seed:03d}-{i:04d}", name, birth.strftime("%Y%m%d"), sex))
    return result
