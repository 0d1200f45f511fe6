"""Where data sets live, and the checksummed download of the official archives.

A download says what it fetches and where before any byte moves, then shows its progress:
by default a line on stderr every 5% (at least every MB); the command line passes a progress
bar instead when stderr is a terminal."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ContextManager

from .errors import DataError
from .names import FORMATS

MB = 2**20
# A download's progress display: given what is fetched and its size in bytes (None: unknown),
# it yields the function each received block's length is passed to.
Progress = Callable[[str, "int | None"], ContextManager[Callable[[int], None]]]

BASE_URL = "https://files.grouplens.org/datasets/movielens"
# Published MD5 sums of the official archives; ml-latest* change over time and have none.
MD5 = {
    "ml-100k": "0e33842e24a9c977be4e0107933c0723",
    "ml-1m": "c4d9eecfca2ab87c1945afe126590906",
    "ml-10m": "ce571fd55effeba0271552578f2648bd",
    "ml-20m": "cd245b17a1ae2cc31bb14903e1204af3",
    "ml-25m": "6b51fb2759a8657d3bfcbfc42b592ada",
}


def data_root(data_dir: str | Path | None = None) -> Path:
    """--data-dir, else $FEDREC_DATA_DIR, else ~/.cache/fedrec."""
    if data_dir:
        return Path(data_dir).expanduser()
    if os.environ.get("FEDREC_DATA_DIR"):
        return Path(os.environ["FEDREC_DATA_DIR"]).expanduser()
    return Path.home() / ".cache" / "fedrec"


def archive_url(name: str) -> str:
    base = os.environ.get("FEDREC_MOVIELENS_URL", BASE_URL).rstrip("/")
    return f"{base}/{name}.zip"


def dataset_folder(name: str, data_dir: str | Path | None = None, download: bool = True,
                   progress: Progress | None = None) -> Path:
    """Folder holding the extracted data set, downloading it first if needed."""
    folder = data_root(data_dir) / FORMATS[name].folder
    if (folder / FORMATS[name].ratings_file).is_file():
        return folder  # an extracted copy is used as is (e.g. --data-dir ../shared/data)
    if not download:
        raise DataError(_missing_message(name, folder, "downloads are turned off"))
    fetch(name, data_dir, progress)
    return folder


@contextlib.contextmanager
def progress_lines(title: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """A line on stderr every 5% of `total` (at least every MB; every MB when the size is unknown)."""
    step = max(MB, (total or 0) // 20)
    done, shown = 0, 0

    def advance(size: int) -> None:
        nonlocal done, shown
        done += size
        if done - shown >= step or done == total:
            shown = done
            of = f" of {total / MB:.1f} MB" if total else " MB"
            print(f"{title}: {done / MB:.1f}{of}", file=sys.stderr, flush=True)

    yield advance


def _missing_message(name: str, folder: Path, why: str) -> str:
    return (
        f"{name} is not at {folder / FORMATS[name].ratings_file} and {why}; download "
        f"{archive_url(name)} and extract it into {folder.parent} (or pass --data-dir)"
    )


def fetch(name: str, data_dir: str | Path | None = None, progress: Progress | None = None) -> Path:
    """Download, MD5-check and extract one archive into the data root."""
    root = data_root(data_dir)
    new = next((p for p in (root, *root.parents)[::-1] if not p.exists()), None)  # first folder this call creates
    try:
        return _fetch(name, root, progress or progress_lines)
    except BaseException:
        # A failed download leaves no trace: not even the (empty) folders made for it.
        for folder in (root, *root.parents) if new else ():
            if folder == new.parent or not folder.is_dir() or any(folder.iterdir()):
                break
            folder.rmdir()
        raise


def _fetch(name: str, root: Path, progress: Progress) -> Path:
    folder = root / FORMATS[name].folder
    url = archive_url(name)
    print(f"{name} is not at {folder}: downloading {url} into {root}", file=sys.stderr, flush=True)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(_missing_message(name, folder, f"{root} cannot be created ({error.strerror})")) from None
    with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as tmp:
        archive = Path(tmp) / f"{name}.zip"
        md5 = hashlib.md5()
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(archive, "wb") as out:
                size = int(response.headers.get("Content-Length") or 0) or None
                with progress(f"{name}.zip", size) as advance:
                    for block in iter(lambda: response.read(MB // 4), b""):  # hashed as it streams: memory stays flat
                        md5.update(block)
                        out.write(block)
                        advance(len(block))
        except OSError as error:
            raise DataError(_missing_message(name, folder, f"the download failed ({error})")) from None
        expected, actual = MD5.get(name), md5.hexdigest()
        if expected and actual != expected:
            raise DataError(
                f"{url} has MD5 {actual}, expected {expected}; the download is corrupt or "
                f"changed: retry, or put the verified files in {folder}"
            )
        staging = Path(tmp) / "extract"
        try:
            with zipfile.ZipFile(archive) as zipped:
                zipped.extractall(staging)
        except zipfile.BadZipFile as error:
            raise DataError(f"{url} is not a valid zip archive ({error}); "
                            f"retry, or put the files in {folder}") from None
        if not (staging / FORMATS[name].folder / FORMATS[name].ratings_file).is_file():
            raise DataError(f"{url} holds no {FORMATS[name].folder}/{FORMATS[name].ratings_file}; put the files "
                            f"in {folder}")
        # Move into place only once complete, so a failed run leaves nothing half-written.
        shutil.move(str(staging / FORMATS[name].folder), folder)
    return folder
