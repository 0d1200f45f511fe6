"""MovieLens loaders on small files written here, in every format, and every bad input."""

from __future__ import annotations

import hashlib
import zipfile

import numpy as np
import pytest

from fedrec.datasets import DataError, load_ratings
from fedrec.datasets import download as dl
from fedrec.datasets.movielens import FORMATS, load_movielens


@pytest.mark.parametrize("name", list(FORMATS))
def test_every_format_loads_with_contiguous_ids_and_titles(tmp_path, name, write_dataset):
    write_dataset(tmp_path, name)
    ratings = load_ratings(name, data_dir=tmp_path)
    assert ratings.n_users == 3 and ratings.n_items == 3
    assert list(ratings.user_ids) == [10, 20, 30] and list(ratings.item_ids) == [100, 200, 300]
    np.testing.assert_array_equal(ratings.data.user, [0, 0, 1, 2])
    np.testing.assert_array_equal(ratings.data.item, [0, 1, 0, 2])
    np.testing.assert_array_equal(ratings.data.rating, [4, 3, 5, 1])
    assert ratings.data.timestamp[0] == 881250949
    assert ratings.item_titles[0] == "Toy Story (1995)"


@pytest.mark.parametrize("name", ["ml-10m", "ml-20m", "ml-latest-small"])
def test_half_star_formats_accept_half_stars(tmp_path, name, write_dataset):
    write_dataset(tmp_path, name, rows=[(1, 1, 0.5, 5), (1, 2, 3.5, 6)])
    np.testing.assert_array_equal(load_ratings(name, data_dir=tmp_path).data.rating, [0.5, 3.5])


def _bad(tmp_path, name, text, write_dataset):
    folder = write_dataset(tmp_path, name)
    (folder / FORMATS[name].ratings_file).write_text(text)
    return folder


@pytest.mark.parametrize("name,text,expected", [
    ("ml-100k", "1\t2\t3\t4\n1\t3\t4\n", r"u.data:2: expected 4 tab-separated fields"),
    ("ml-100k", "1,2,3,4\n", r"u.data:1: expected 4 tab-separated fields.*looks separated by ','"),
    ("ml-100k", "1\t2\t3\t4\nx\t2\t3\t4\n", r"u.data:2: user id 'x' is not an integer"),
    ("ml-100k", "1\t2\tgood\t4\n", r"u.data:1: rating 'good' is not a number"),
    ("ml-100k", "1\t2\t6\t4\n", r"u.data:1: rating 6 is out of range"),
    ("ml-100k", "1\t2\t3.5\t4\n", r"u.data:1: rating 3.5 is out of range; expected 1 to 5, a whole number"),
    ("ml-100k", "1\t2\t3\t4\n\n1\t3\t9\t4\n", r"u.data:3: rating 9 is out of range"),
    ("ml-1m", "1::2::3::4\n1::2::3\n", r"ratings.dat:2: expected 4 '::'-separated fields"),
    ("ml-1m", "1\t2\t3\t4\n", r"ratings.dat:1: expected 4 '::'-separated fields.*looks separated by '\\t'"),
    ("ml-20m", "userId,movieId,rating,timestamp\n1,2,0.25,4\n", r"ratings.csv:2: rating 0.25 is out of range"),
    ("ml-20m", "userId,movieId,rating,timestamp\n1,2,3,4,5\n", r"ratings.csv:2: expected 4 comma-separated"),
    ("ml-100k", "1\t2\t3\t4\n" * 200 + "1\t2\t3\t4\t5\n", r"u.data:201: expected 4 tab-separated fields"),
    ("ml-100k", f"{2**70}\t2\t3\t4\n", rf"u.data:1: user id {2**70} does not fit a 64-bit integer"),
    ("ml-100k", f"1\t{2**63}\t3\t4\n", rf"u.data:1: item id {2**63} does not fit a 64-bit integer"),
    ("ml-100k", "1\t2\t3\t4\n-1\t2\t3\t4\n", r"u.data:2: user id -1 is negative"),
    ("ml-100k", "1\t2.5\t3\t4\n", r"u.data:1: item id '2.5' is not an integer"),
    ("ml-1m", "1::2::3::4\n" * 150 + "1::2::3::99999999999999999999\n", r"ratings.dat:151: timestamp 9+ does not fit"),
    ("ml-1m", "1::2::3::4\n1::-7::3::4\n", r"ratings.dat:2: item id -7 is negative"),
    ("ml-20m", "userId,movieId,rating,timestamp\n1,2,nan,4\n", r"ratings.csv:2: rating nan is out of range"),
    ("ml-100k", "1\t2\t3\t4\n" + "\x00garbage" * 1000 + "\n", r"u.data:2: line longer than 4096 characters"),
])
def test_bad_lines_name_file_and_line(tmp_path, name, text, expected, write_dataset):
    _bad(tmp_path, name, text, write_dataset)
    with pytest.raises(DataError, match=expected):
        load_ratings(name, data_dir=tmp_path)


def test_duplicate_pairs_are_an_error_naming_both_lines(tmp_path, write_dataset):
    _bad(tmp_path, "ml-100k", "1\t2\t3\t4\n\n5\t6\t1\t4\n1\t2\t5\t9\n", write_dataset)
    with pytest.raises(DataError, match=r"u.data:4: duplicate rating of item 2 by user 1 \(first at line 1\)"):
        load_ratings("ml-100k", data_dir=tmp_path)


def test_empty_and_missing_files(tmp_path, write_dataset):
    folder = _bad(tmp_path, "ml-100k", "", write_dataset)
    with pytest.raises(DataError, match="u.data: file is empty"):
        load_ratings("ml-100k", data_dir=tmp_path)
    (folder / "u.data").unlink()
    with pytest.raises(DataError, match="file not found"):
        load_movielens("ml-100k", folder)


def _archive(tmp_path, name, write_dataset):
    src = tmp_path / "src"
    folder = write_dataset(src, name)
    archive = tmp_path / "mirror" / f"{name}.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as z:
        for f in folder.iterdir():
            z.write(f, f"{folder.name}/{f.name}")
    return archive


def test_download_verifies_md5_and_extracts(tmp_path, monkeypatch, write_dataset):
    archive = _archive(tmp_path, "ml-1m", write_dataset)
    monkeypatch.setenv("FEDREC_MOVIELENS_URL", archive.parent.as_uri())
    monkeypatch.setitem(dl.MD5, "ml-1m", hashlib.md5(archive.read_bytes()).hexdigest())
    ratings = load_ratings("ml-1m", data_dir=tmp_path / "root")
    assert ratings.n_users == 3
    assert (tmp_path / "root" / "ml-1m" / "ratings.dat").is_file()


def test_download_with_wrong_md5_leaves_nothing_behind(tmp_path, monkeypatch, write_dataset):
    archive = _archive(tmp_path, "ml-1m", write_dataset)
    monkeypatch.setenv("FEDREC_MOVIELENS_URL", archive.parent.as_uri())
    monkeypatch.setitem(dl.MD5, "ml-1m", "0" * 32)
    with pytest.raises(DataError, match=r"ml-1m.zip has MD5 .* expected 0000"):
        load_ratings("ml-1m", data_dir=tmp_path / "root" / "data")
    assert not (tmp_path / "root").exists()  # not even the folders made for the download


def test_a_download_says_what_and_where_before_any_byte_then_shows_progress(tmp_path, monkeypatch,
                                                                           write_dataset, capsys):
    folder = write_dataset(tmp_path / "src", "ml-1m")
    (folder / "padding.bin").write_bytes(np.random.default_rng(0).bytes(int(2.5 * dl.MB)))  # incompressible
    archive = _archive(tmp_path, "ml-1m", write_dataset)
    monkeypatch.setenv("FEDREC_MOVIELENS_URL", archive.parent.as_uri())
    monkeypatch.setitem(dl.MD5, "ml-1m", hashlib.md5(archive.read_bytes()).hexdigest())
    said_first = []
    urlopen = dl.urllib.request.urlopen

    def opened(*args, **kwargs):
        said_first.append(capsys.readouterr().err)  # what was on stderr when the first byte was asked for
        return urlopen(*args, **kwargs)

    monkeypatch.setattr(dl.urllib.request, "urlopen", opened)
    load_ratings("ml-1m", data_dir=tmp_path / "root")
    assert said_first == [f"ml-1m is not at {tmp_path / 'root' / 'ml-1m'}: downloading {archive.as_uri()} into "
                          f"{tmp_path / 'root'}\n"]
    size = archive.stat().st_size / dl.MB
    assert capsys.readouterr().err.splitlines() == [f"ml-1m.zip: {done:.1f} of {size:.1f} MB"
                                                    for done in (1.0, 2.0, size)]  # a line per MB (5% steps)
    load_ratings("ml-1m", data_dir=tmp_path / "root")
    assert capsys.readouterr().err == ""  # there already: nothing fetched, nothing said


def test_the_command_line_announces_a_download_too(tmp_path, monkeypatch, write_dataset):
    from typer.testing import CliRunner

    from fedrec.cli.main import cli

    archive = _archive(tmp_path, "ml-1m", write_dataset)
    monkeypatch.setenv("FEDREC_MOVIELENS_URL", archive.parent.as_uri())
    monkeypatch.setitem(dl.MD5, "ml-1m", hashlib.md5(archive.read_bytes()).hexdigest())
    result = CliRunner().invoke(cli, ["partition", "--dataset", "ml-1m", "--data-dir", str(tmp_path / "root"),
                                      "--nodes", "1", "--out", str(tmp_path / "shards")])
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert lines[0] == f"ml-1m is not at {tmp_path / 'root' / 'ml-1m'}: downloading {archive.as_uri()} into " \
                       f"{tmp_path / 'root'}"
    assert lines[1].startswith("ml-1m.zip: 0.0 of 0.0 MB")  # a file of a few hundred bytes: one line at its end


def test_offline_error_names_url_and_path(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDREC_MOVIELENS_URL", (tmp_path / "nowhere").as_uri())
    with pytest.raises(DataError) as info:
        load_ratings("ml-25m", data_dir=tmp_path / "root")
    message = str(info.value)
    assert "ml-25m.zip" in message and str(tmp_path / "root" / "ml-25m" / "ratings.csv") in message
    assert not (tmp_path / "root").exists()
    (tmp_path / "kept").mkdir()
    with pytest.raises(DataError):
        load_ratings("ml-25m", data_dir=tmp_path / "kept")
    assert list((tmp_path / "kept").iterdir()) == []  # a folder that existed before stays


def test_large_ids_keep_their_values(tmp_path, write_dataset):
    rows = [(2**63 - 1, 5, 4, 1), (2**40, 5, 3, 2), (0, 2**62, 1, 3)]
    ratings = load_ratings("ml-100k", data_dir=write_dataset(tmp_path, "ml-100k", rows=rows).parent)
    assert list(ratings.user_ids) == [0, 2**40, 2**63 - 1] and ratings.n_users == 3
    assert list(ratings.item_ids) == [5, 2**62]


def test_oversized_files_are_refused_before_reading(tmp_path, write_dataset):
    folder = write_dataset(tmp_path, "ml-100k")
    with open(folder / "u.data", "r+b") as handle:
        handle.truncate(2 * 2**30)  # a sparse 2 GB file: reading it would take gigabytes of memory
    with pytest.raises(DataError, match=r"u.data: 2,048 MB is far more than ml-100k's 100,000 ratings take"):
        load_ratings("ml-100k", data_dir=tmp_path)
    folder = write_dataset(tmp_path / "b", "ml-20m")
    (folder / "movies.csv").write_text("movieId,title\nnot a number,x\n")
    with pytest.raises(DataError, match="movies.csv: not a MovieLens titles file"):
        load_ratings("ml-20m", data_dir=tmp_path / "b")


def test_data_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDREC_DATA_DIR", str(tmp_path / "env"))
    assert dl.data_root(tmp_path / "flag") == tmp_path / "flag"
    assert dl.data_root(None) == tmp_path / "env"
    monkeypatch.delenv("FEDREC_DATA_DIR")
    assert dl.data_root(None).parts[-2:] == (".cache", "fedrec")
