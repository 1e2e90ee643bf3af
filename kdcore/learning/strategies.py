"""Strategy names: the grammar ``base[+part...]``, the catalogue and the reading order. No torch.

Pages, charts, the store and the CLI read, check and sort strategy names without importing
torch; the losses that give a name its meaning are in :mod:`kdcore.learning.losses`, whose
``METHODS`` has one entry per distilling base here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kdcore.errors import DataError

BASES = ("ce", "kd", "dkd", "ls", "dist", "rld")  # ce: labels alone; the others distil
PARTS = ("be", "br", "dl", "lq")
BTKD = "btkd"  # the paper's exact recipe: kd+be+br+dl, subset normalisation, cos^2 to 0
DEFAULT_STRATEGIES = ("ce", "kd", "kd+be", "kd+be+br", "kd+be+br+dl")
# Offered by name (the Train page's choices): the defaults, then the others worth a click; any
# other valid name can still be typed.
CATALOGUE = (*DEFAULT_STRATEGIES, "kd+be+br+dl+lq", "dkd", "dkd+be", "dkd+be+br", "dkd+be+br+dl",
             BTKD, "ls", "ls+be+br+dl", "dist", "dist+be+br+dl", "rld", "rld+be")
# Parts that have no meaning on a base, with the reason parse_strategy gives (README's table).
REFUSED_PARTS = {
    ("rld", "br"): "rld already moves the teacher's top confidence onto the label (its SCD term) "
                   "and distils only the classes ranked below the label (MCD); a swap would put "
                   "the mistaken class back among those, so use rld or rld+be",
}
# Plain-language names for people who do not read the grammar: a base, then its parts.
PLAIN_NAMES = {
    "ce": "labels only", "kd": "KD", "dkd": "DKD (decoupled KD)", "ls": "logit-standardised KD",
    "dist": "DIST (correlation KD)", "rld": "refined-logit KD", BTKD: "the paper's exact recipe",
    "be": "bias removed", "br": "rectified", "dl": "scheduled", "lq": "label-error aware",
}


@dataclass(frozen=True)
class Strategy:
    """A base loss plus bias-aware parts, e.g. ``kd+be+br+dl``; ``ce`` trains on labels alone."""

    base: str
    be: bool = False
    br: bool = False
    dl: bool = False
    lq: bool = False  # label-quality aware: likely label errors are not rectified
    normalisation: str = "batch"

    @property
    def name(self) -> str:
        return "+".join([self.base] + [p for p in PARTS if getattr(self, p)])

    @property
    def bias_aware(self) -> bool:
        return self.be or self.br

    @property
    def distills(self) -> bool:
        return self.base != "ce"


def parse_strategy(text: str, *, normalisation: str = "batch") -> Strategy:
    """Parse ``base[+part...]`` (parts be, br, dl, lq in any order) or ``btkd``."""
    text = text.strip().lower()
    if text == BTKD:
        return Strategy("kd", be=True, br=True, dl=True, normalisation="subset")
    base, *parts = text.split("+")
    if base not in BASES:
        raise DataError(
            f"unknown base loss {base!r} in strategy {text!r}; use "
            f"{', '.join(BASES)} or btkd, e.g. kd+be+br+dl"
        )
    unknown = [p for p in parts if p not in PARTS]
    if unknown or len(set(parts)) != len(parts):
        raise DataError(
            f"bad parts {parts} in strategy {text!r}; each of {', '.join(PARTS)} at most once"
        )
    if base == "ce" and parts:
        raise DataError(f"strategy {text!r}: ce trains on labels alone and takes no parts")
    for part in parts:
        if (base, part) in REFUSED_PARTS:
            raise DataError(f"strategy {text!r}: {base}+{part} is refused: "
                            f"{REFUSED_PARTS[base, part]}")
    if "dl" in parts and not ({"be", "br"} & set(parts)):
        raise DataError(f"strategy {text!r}: dl schedules be/br, so add +be or +br")
    if "lq" in parts and not ({"be", "br"} & set(parts)):
        raise DataError(f"strategy {text!r}: lq keeps likely label errors out of be/br, so add "
                        "+be or +br")
    if normalisation not in ("batch", "subset"):
        raise DataError(f"normalisation {normalisation!r}: use batch or subset")
    return Strategy(base, **{p: True for p in parts}, normalisation=normalisation)


def is_bias_aware(name: str | None) -> bool:
    """True for a strategy with bias elimination or rectification (btkd included)."""
    try:
        return bool(name) and parse_strategy(name).bias_aware
    except DataError:
        return False


_BASE_RANK = {"ce": 0, "kd": 1, "btkd": 2, "dkd": 3, "ls": 4, "dist": 5, "rld": 6}


def strategy_order(names: Sequence[str]) -> list[str]:
    """Reading order: ce, kd and its variants (fewest parts first), btkd, then dkd, ls, dist and
    rld, each followed by its variants; unknown names last."""
    def key(name: str) -> tuple:
        base, *parts = str(name).split("+")
        return (_BASE_RANK.get(base, len(_BASE_RANK)), len(parts), str(name))
    return sorted(names, key=key)


def plain_name(code: str) -> str:
    """A strategy in words, e.g. ``kd+be+br+dl`` -> "KD, bias removed, rectified, scheduled".

    Composed from :data:`PLAIN_NAMES` for any valid name (DataError for an invalid one), so a
    page can show what a strategy does to someone who does not read the grammar.
    """
    text = code.strip().lower()
    strategy = parse_strategy(text)
    if text == BTKD:
        return PLAIN_NAMES[BTKD]
    return ", ".join(PLAIN_NAMES[p] for p in strategy.name.split("+"))
