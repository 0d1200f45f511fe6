"""MovieLens loaders for every published format, with strict input checking.

Good files take the fast path (pandas' C parser). When anything about a file looks wrong
we re-scan it line by line, only then, to name the first bad line exactly.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .interactions import DataError, Interactions, Ratings
from .names import FORMATS, Format

if TYPE_CHECKING:  # pandas is imported where a data set is read: a device opening its shard never needs it
    import pandas as pd


_SEP_NAMES = {"\t": "tab", "::": "'::'", ",": "comma"}
CHUNK_ROWS = 1_000_000  # rows parsed at a time: memory is the compact result plus one chunk
MAX_LINE = 4096  # no ratings line is longer; a longer one is not a ratings file (and is not read whole)
MAX_ID = 2**63 - 1
TITLES_MAX_BYTES = 64 * 2**20


def read_ratings_file(path: Path, fmt: Format) -> pd.DataFrame:
    """Parse one ratings file into columns user, item, rating, timestamp (original ids)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"{path}: file is empty; expected {_SEP_NAMES[fmt.separator]}-separated ratings")
    if size > fmt.max_bytes:
        raise DataError(f"{path}: {size / 2**20:,.0f} MB is far more than {fmt.folder}'s {fmt.size[2]:,} ratings "
                        f"take (at most {fmt.max_bytes / 2**20:,.0f} MB); this is not {fmt.folder}: re-extract the "
                        "official archive")
    try:
        _raise_first_bad_line(path, fmt, max_lines=100)  # garbage is caught here, before pandas buffers it
        try:
            frame = _fast_parse(path, fmt)
        except (ValueError, OverflowError):  # a parser error or a value that is not an int64
            frame = None
        if frame is None:
            _raise_first_bad_line(path, fmt)  # names the bad line; always raises when something is wrong
    except OSError as error:
        raise DataError(f"{path}: cannot be read ({error.strerror})") from None
    if len(frame) == 0:
        raise DataError(f"{path}: no ratings in file")
    _check_duplicates(path, frame, fmt)
    return frame


def _fast_parse(path: Path, fmt: Format) -> pd.DataFrame | None:
    """pandas' C parser, typed and in chunks; None when any row fails a check."""
    import pandas as pd

    if fmt.separator == "::":
        # '::' as a separator needs pandas' slow Python engine; splitting on ':' keeps the
        # C parser and leaves empty columns between the fields.
        sep, width, columns = ":", 7, (0, 2, 4, 6)
    else:
        sep, width, columns = fmt.separator, 4, (0, 1, 2, 3)
    dtype = {c: np.float64 for c in range(width)} | {columns[0]: np.int64, columns[1]: np.int64, columns[3]: np.int64}
    parts = []
    with pd.read_csv(path, sep=sep, header=None, skiprows=1 if fmt.header else 0, dtype=dtype, engine="c",
                     index_col=False, chunksize=CHUNK_ROWS) as reader:
        for chunk in reader:
            if chunk.shape[1] != width or (width == 7 and not chunk[[1, 3, 5]].isna().all(axis=None)):
                return None
            user, item, rating, timestamp = (chunk[c].to_numpy() for c in columns)
            if (user < 0).any() or (item < 0).any() or not _ratings_ok(rating, fmt).all():
                return None
            parts.append((user, item, rating.astype(np.float32), timestamp))
    names = ("user", "item", "rating", "timestamp")
    return pd.DataFrame({n: np.concatenate([p[k] for p in parts]) for k, n in enumerate(names)})


def _ratings_ok(rating: np.ndarray, fmt: Format) -> np.ndarray:
    steps = rating * (2 if fmt.half_stars else 1)
    with np.errstate(invalid="ignore"):
        return (rating >= (0.5 if fmt.half_stars else 1.0)) & (rating <= 5.0) & (steps == np.round(steps))


def _lines(path: Path, fmt: Format):
    """(line number, text) of each data line, header and blank lines skipped, never reading a huge line whole."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number in itertools.count(1):
            line = handle.readline(MAX_LINE + 1)
            if not line:
                return
            if len(line) > MAX_LINE:
                raise DataError(f"{path}:{number}: line longer than {MAX_LINE} characters; this is not a "
                                f"{_SEP_NAMES[fmt.separator]}-separated ratings file")
            if (fmt.header and number == 1) or not line.strip():
                continue  # blank lines are skipped, as the fast parser does
            yield number, line.rstrip("\r\n")


def _raise_first_bad_line(path: Path, fmt: Format, max_lines: int | None = None) -> None:
    """Raise on the first bad line; with max_lines, return quietly when that many lines are good."""
    lo = 0.5 if fmt.half_stars else 1
    step = "a multiple of 0.5" if fmt.half_stars else "a whole number"
    sep_name = _SEP_NAMES[fmt.separator]
    for count, (number, line) in enumerate(_lines(path, fmt), start=1):
        if max_lines is not None and count > max_lines:
            return
        where = f"{path}:{number}"
        fields = line.split(fmt.separator)
        if len(fields) != 4:
            others = [s for s in ("\t", "::", ",", ";", "|", " ") if s != fmt.separator and s in line]
            hint = f" (it looks separated by {others[0]!r})" if others and len(fields) == 1 else ""
            raise DataError(
                f"{where}: expected 4 {sep_name}-separated fields (user, item, rating, timestamp), "
                f"found {len(fields)}{hint}"
            )
        for name, text in zip(("user id", "item id", "timestamp"), (fields[0], fields[1], fields[3])):
            if not re.fullmatch(r"\s*-?\d+(\.0*)?\s*", text):  # pandas reads 3.0 as the integer 3
                raise DataError(f"{where}: {name} {text.strip()!r} is not an integer")
            value = int(text.strip().split(".")[0])
            if abs(value) > MAX_ID:
                raise DataError(f"{where}: {name} {text.strip()} does not fit a 64-bit integer")
            if value < 0 and name != "timestamp":
                raise DataError(f"{where}: {name} {value} is negative; ids are whole numbers >= 0")
        try:
            rating = float(fields[2])
        except ValueError:
            raise DataError(f"{where}: rating {fields[2]!r} is not a number") from None
        if not (lo <= rating <= 5) or (rating * (2 if fmt.half_stars else 1)) % 1:
            raise DataError(f"{where}: rating {fields[2]} is out of range; expected {lo} to 5, {step}")
    if max_lines is None:
        raise DataError(f"{path}: could not be parsed as {sep_name}-separated ratings")


def _check_duplicates(path: Path, frame: pd.DataFrame, fmt: Format) -> None:
    dup = frame.duplicated(subset=["user", "item"], keep="first").to_numpy()
    if dup.any():
        row = int(np.flatnonzero(dup)[0])
        first = int(np.flatnonzero((frame["user"] == frame["user"].iat[row]).to_numpy()
                                   & (frame["item"] == frame["item"].iat[row]).to_numpy())[0])
        lines = _line_numbers(path, fmt, {row, first})
        raise DataError(
            f"{path}:{lines[row]}: duplicate rating of item {int(frame['item'].iat[row])} by user "
            f"{int(frame['user'].iat[row])} (first at line {lines[first]}); keep one rating per pair"
        )


def _line_numbers(path: Path, fmt: Format, rows: set[int]) -> dict[int, int]:
    """File line number of some data rows (header and blank lines skipped); error path only."""
    found = {}
    for row, (number, _) in enumerate(_lines(path, fmt)):
        if row in rows:
            found[row] = number
            if len(found) == len(rows):
                break
    return found


def read_titles(path: Path, fmt: Format) -> dict[int, str]:
    """Map original movie id -> title; empty when the file is absent (titles are optional)."""
    import pandas as pd

    if fmt.titles_file is None or not Path(path).is_file():
        return {}
    if Path(path).stat().st_size > TITLES_MAX_BYTES:
        raise DataError(f"{path}: {Path(path).stat().st_size / 2**20:,.0f} MB is not a MovieLens titles file "
                        f"(those are under {TITLES_MAX_BYTES / 2**20:.0f} MB); re-extract the official archive")
    if fmt.titles_separator == ",":
        try:
            movies = pd.read_csv(path, usecols=[0, 1], dtype={0: np.int64, 1: str}, encoding="utf-8")
        except (ValueError, OverflowError) as error:
            raise DataError(f"{path}: not a MovieLens titles file (movieId,title,...): {error}") from None
        return dict(zip(movies.iloc[:, 0], movies.iloc[:, 1]))
    titles = {}
    with open(path, encoding="latin-1") as handle:  # the old archives are not UTF-8
        for line in iter(lambda: handle.readline(MAX_LINE), ""):
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
            raise DataError(f"{path}:{unknown[0] + 1}: {column} {values[unknown[0]]} "
                            f"is not in the data set's full ratings file")
        out.append(pos)
    return Interactions.build(out[0], out[1], frame["rating"].to_numpy(np.float32),
                              frame["timestamp"].to_numpy(np.int64))
