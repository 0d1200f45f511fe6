"""MovieLens loaders for every published format, with strict input checking.

Good files take the fast path (pandas' C parser). When anything about a file looks wrong
we re-scan it line by line, only then, to name the first bad line exactly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .interactions import DataError, Interactions, Ratings


@dataclass(frozen=True)
class Format:
    folder: str  # directory the official archive extracts to
    ratings_file: str
    separator: str  # "\t", "::" or ","
    header: bool
    half_stars: bool
    titles_file: str | None
    titles_separator: str


FORMATS: dict[str, Format] = {
    "ml-100k": Format("ml-100k", "u.data", "\t", False, False, "u.item", "|"),
    "ml-1m": Format("ml-1m", "ratings.dat", "::", False, False, "movies.dat", "::"),
    "ml-10m": Format("ml-10M100K", "ratings.dat", "::", False, True, "movies.dat", "::"),
    "ml-20m": Format("ml-20m", "ratings.csv", ",", True, True, "movies.csv", ","),
    "ml-25m": Format("ml-25m", "ratings.csv", ",", True, True, "movies.csv", ","),
    "ml-latest-small": Format("ml-latest-small", "ratings.csv", ",", True, True, "movies.csv", ","),
    "ml-latest": Format("ml-latest", "ratings.csv", ",", True, True, "movies.csv", ","),
}
MOVIELENS = tuple(FORMATS)
_SEP_NAMES = {"\t": "tab", "::": "'::'", ",": "comma"}


def read_ratings_file(path: Path, fmt: Format) -> pd.DataFrame:
    """Parse one ratings file into columns user, item, rating, timestamp (original ids)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty; expected {_SEP_NAMES[fmt.separator]}-separated ratings")
    try:
        frame = _fast_parse(path, fmt)
    except (ValueError, pd.errors.ParserError):
        frame = None
    if frame is None or _first_problem(frame, fmt) is not None:
        _raise_first_bad_line(path, fmt)  # always raises when something is wrong
    if len(frame) == 0:
        raise DataError(f"{path}: no ratings in file")
    _check_duplicates(path, frame, fmt)
    return frame


def _fast_parse(path: Path, fmt: Format) -> pd.DataFrame:
    names = ["user", "item", "rating", "timestamp"]
    if fmt.separator == "::":
        # '::' as a separator needs pandas' slow Python engine; splitting on ':' keeps the
        # C parser and leaves empty columns between the fields.
        raw = pd.read_csv(path, sep=":", header=None, dtype=str, engine="c", keep_default_na=False, index_col=False)
        if raw.shape[1] != 7:
            return None
        raw = raw.iloc[:, [0, 2, 4, 6]]
        raw.columns = names
    else:
        raw = pd.read_csv(path, sep=fmt.separator, header=None, skiprows=1 if fmt.header else 0, dtype=str,
                          engine="c", keep_default_na=False, index_col=False)
        if raw.shape[1] != 4:
            return None
        raw.columns = names
    out = pd.DataFrame({
        "user": pd.to_numeric(raw["user"], errors="coerce"),
        "item": pd.to_numeric(raw["item"], errors="coerce"),
        "rating": pd.to_numeric(raw["rating"], errors="coerce"),
        "timestamp": pd.to_numeric(raw["timestamp"], errors="coerce"),
    })
    return out


def _first_problem(frame: pd.DataFrame, fmt: Format) -> int | None:
    """Index of the first row that fails a check, or None."""
    lo = 0.5 if fmt.half_stars else 1.0
    bad = frame.isna().any(axis=1).to_numpy().copy()
    vals = frame.to_numpy(dtype=float, na_value=np.nan)
    with np.errstate(invalid="ignore"):
        ids_ok = (vals[:, [0, 1, 3]] == np.round(vals[:, [0, 1, 3]])).all(axis=1)
        steps = vals[:, 2] * (2 if fmt.half_stars else 1)
        rating_ok = (vals[:, 2] >= lo) & (vals[:, 2] <= 5.0) & (steps == np.round(steps))
    bad |= ~(ids_ok & rating_ok)
    hits = np.flatnonzero(bad)
    return int(hits[0]) if len(hits) else None


def _raise_first_bad_line(path: Path, fmt: Format) -> None:
    lo = 0.5 if fmt.half_stars else 1
    step = "a multiple of 0.5" if fmt.half_stars else "a whole number"
    sep_name = _SEP_NAMES[fmt.separator]
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if fmt.header and number == 1:
                continue
            line = line.rstrip("\r\n")
            where = f"{path}:{number}"
            if not line.strip():
                continue  # blank lines are skipped, as the fast parser does
            fields = line.split(fmt.separator)
            if len(fields) != 4:
                others = [s for s in ("\t", "::", ",", ";", "|", " ") if s != fmt.separator and s in line]
                hint = f" (it looks separated by {others[0]!r})" if others and len(fields) == 1 else ""
                raise DataError(
                    f"{where}: expected 4 {sep_name}-separated fields (user, item, rating, timestamp), "
                    f"found {len(fields)}{hint}"
                )
            for name, text in zip(("user id", "item id", "timestamp"), (fields[0], fields[1], fields[3])):
                if not re.fullmatch(r"\s*-?\d+\s*", text):
                    raise DataError(f"{where}: {name} {text!r} is not an integer")
            try:
                rating = float(fields[2])
            except ValueError:
                raise DataError(f"{where}: rating {fields[2]!r} is not a number") from None
            if not (lo <= rating <= 5) or (rating * (2 if fmt.half_stars else 1)) % 1:
                raise DataError(f"{where}: rating {fields[2]} is out of range; expected {lo} to 5, {step}")
    raise DataError(f"{path}: could not be parsed as {sep_name}-separated ratings")


def _check_duplicates(path: Path, frame: pd.DataFrame, fmt: Format) -> None:
    dup = frame.duplicated(subset=["user", "item"], keep="first").to_numpy()
    if dup.any():
        row = int(np.flatnonzero(dup)[0])
        first = frame.index[(frame["user"] == frame["user"].iat[row]) & (frame["item"] == frame["item"].iat[row])][0]
        lines = _data_line_numbers(path, fmt)
        raise DataError(
            f"{path}:{lines[row]}: duplicate rating of item {int(frame['item'].iat[row])} by user "
            f"{int(frame['user'].iat[row])} (first at line {lines[first]}); keep one rating per pair"
        )


def _data_line_numbers(path: Path, fmt: Format) -> list[int]:
    """File line number of each data row (header and blank lines skipped); error path only."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        return [n for n, line in enumerate(handle, start=1) if line.strip() and not (fmt.header and n == 1)]


def read_titles(path: Path, fmt: Format) -> dict[int, str]:
    """Map original movie id -> title; empty when the file is absent (titles are optional)."""
    if fmt.titles_file is None or not Path(path).is_file():
        return {}
    if fmt.titles_separator == ",":
        movies = pd.read_csv(path, usecols=[0, 1], dtype={0: np.int64, 1: str}, encoding="utf-8")
        return dict(zip(movies.iloc[:, 0], movies.iloc[:, 1]))
    titles = {}
    with open(path, encoding="latin-1") as handle:  # the old archives are not UTF-8
        for line in handle:
            fields = line.rstrip("\n").split(fmt.titles_separator)
            if len(fields) >= 2 and fields[0].strip().isdigit():
                titles[int(fields[0])] = fields[1]
    return titles


def load_movielens(name: str, folder: Path) -> Ratings:
    """Load the full ratings of data set `name` from its extracted folder."""
    fmt = FORMATS[name]
    frame = read_ratings_file(Path(folder) / fmt.ratings_file, fmt)
    titles = read_titles(Path(folder) / fmt.titles_file, fmt) if fmt.titles_file else {}
    return to_ratings(name, frame, titles, fmt)


def to_ratings(name: str, frame: pd.DataFrame, titles: dict[int, str], fmt: Format) -> Ratings:
    user_ids, user = np.unique(frame["user"].to_numpy(np.int64), return_inverse=True)
    item_ids, item = np.unique(frame["item"].to_numpy(np.int64), return_inverse=True)
    data = Interactions.build(user, item, frame["rating"].to_numpy(np.float32), frame["timestamp"].to_numpy(np.int64))
    item_titles = np.array([titles.get(int(i), "") for i in item_ids], dtype=object) if titles else None
    lo = 0.5 if fmt.half_stars else 1.0
    return Ratings(name, data, user_ids, item_ids, item_titles, (lo, 5.0))


def map_ids(frame: pd.DataFrame, ratings: Ratings, path: Path) -> Interactions:
    """Map a ratings file's original ids onto the contiguous ids of `ratings`."""
    out = []
    for column, ids in (("user", ratings.user_ids), ("item", ratings.item_ids)):
        values = frame[column].to_numpy(np.int64)
        pos = np.clip(np.searchsorted(ids, values), 0, len(ids) - 1)
        unknown = np.flatnonzero(ids[pos] != values)
        if len(unknown):
            raise DataError(f"{path}:{unknown[0] + 1}: {column} {values[unknown[0]]} is not in the data set's full ratings file")
        out.append(pos)
    return Interactions.build(out[0], out[1], frame["rating"].to_numpy(np.float32), frame["timestamp"].to_numpy(np.int64))
