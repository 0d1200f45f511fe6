"""What the run config reads from the data layer: the data sets and their formats, the splits,
and the defaults of splits and synthetic data.

Plain Python (no numpy or pandas), so that the run config, and the command line built from
it, load in a fraction of a second; the loaders import these from here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Format:
    folder: str  # directory the official archive extracts to
    ratings_file: str
    separator: str  # "\t", "::" or ","
    header: bool
    half_stars: bool
    titles_file: str | None
    titles_separator: str
    size: tuple[int, int, int]  # users, items, ratings of the release (ml-latest grows: its 2023 numbers)

    @property
    def max_bytes(self) -> int:
        """Largest ratings file accepted: twice the longest plausible line per rating (ml-latest
        grows, so 4 GB), so that a wrong or corrupt file is refused before it is read into memory."""
        return 4 * 2**30 if self.folder == "ml-latest" else max(64 * self.size[2], 16 * 2**20)


FORMATS: dict[str, Format] = {
    "ml-100k": Format("ml-100k", "u.data", "\t", False, False, "u.item", "|", (943, 1682, 100_000)),
    "ml-1m": Format("ml-1m", "ratings.dat", "::", False, False, "movies.dat", "::", (6040, 3706, 1_000_209)),
    "ml-10m": Format("ml-10M100K", "ratings.dat", "::", False, True, "movies.dat", "::", (69_878, 10_677, 10_000_054)),
    "ml-20m": Format("ml-20m", "ratings.csv", ",", True, True, "movies.csv", ",", (138_493, 26_744, 20_000_263)),
    "ml-25m": Format("ml-25m", "ratings.csv", ",", True, True, "movies.csv", ",", (162_541, 59_047, 25_000_095)),
    "ml-latest-small": Format("ml-latest-small", "ratings.csv", ",", True, True, "movies.csv", ",",
                              (610, 9724, 100_836)),
    "ml-latest": Format("ml-latest", "ratings.csv", ",", True, True, "movies.csv", ",", (330_975, 83_239, 33_832_162)),
}
MOVIELENS = tuple(FORMATS)
KNOWN_SIZES = {name: fmt.size for name, fmt in FORMATS.items()}

CANONICAL = ("u1", "u2", "u3", "u4", "u5")  # ML-100K's own five train/test folds
DATASETS = ("synthetic", *MOVIELENS)
SPLITS = ("random", "loo", *CANONICAL)
DEFAULT_SPLIT = "random"
TEST_FRACTION = 0.2  # random holdout: share of each user's ratings held out
TEST_NEGATIVES = 99  # leave-one-out: sampled negatives ranked against each test positive


@dataclass(frozen=True)
class SyntheticSpec:
    users: int = 2000
    """Number of users."""
    items: int = 500
    """Number of items."""
    density: float = 0.05
    """Expected fraction of the user x item matrix that is rated."""
    rank: int = 8
    """Rank of the true preference matrix."""
    noise: float = 0.5
    """Std of the Gaussian noise added to each true rating before rounding."""
    min_user_ratings: int = 5
    """Rating draws per user at least (a few may collapse as duplicates)."""
    activity_exponent: float = 1.5
    """Pareto shape of user activity: smaller means a longer tail of heavy users."""
    popularity_exponent: float = 0.8
    """Zipf exponent of item popularity: larger means more concentrated on hits."""
    seed: int = 0
    """Seed of everything random in the generator."""
