import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from streamrec.data.clicklog import DataError, load_clicks, sessionize
from trainer.data import (
    admit_new_items,
    filter_users,
    preprocess,
    restrict_to_items,
    split_by_time,
    split_last_session_out,
)

TSV = "SessionId\tItemId\tTime\n1\t10\t100.5\n1\t11\t101\n2\t10\t200\n"


def _write(path: Path, text: str, gz: bool = False) -> Path:
    if gz:
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def _frame(rows: list[tuple], cols: tuple[str, ...] = ("SessionId", "ItemId", "Time")):
    df = pd.DataFrame(rows, columns=list(cols))
    for c in cols:
        df[c] = df[c].astype(np.float64) if c == "Time" else df[c].astype(str)
    return df


# ----------------------------------------------------------------------------- loaders


@pytest.mark.parametrize("gz", [False, True])
def test_gru4rec_tsv_plain_and_gzip(tmp_path: Path, gz: bool) -> None:
    path = _write(tmp_path / ("a.tsv.gz" if gz else "a.txt"), TSV, gz)
    df = load_clicks(path)
    assert list(df.columns) == ["SessionId", "ItemId", "Time"]
    assert df["SessionId"].tolist() == ["1", "1", "2"]
    assert df["ItemId"].tolist() == ["10", "11", "10"]
    assert df["Time"].dtype == np.float64
    assert df["Time"].tolist() == [100.5, 101.0, 200.0]


def test_gzip_detected_from_bytes_not_name(tmp_path: Path) -> None:
    path = _write(tmp_path / "clicks.tsv", TSV, gz=True)
    assert len(load_clicks(path)) == 3


def test_optional_user_column_and_ids_stay_strings(tmp_path: Path) -> None:
    text = "UserId\tSessionId\tItemId\tTime\n007\t01\t0042\t5\n007\t01\t43\t6\n"
    df = load_clicks(_write(tmp_path / "u.tsv", text))
    assert list(df.columns) == ["SessionId", "ItemId", "Time", "UserId"]
    # leading zeros survive: ids are never parsed as numbers
    assert df["UserId"].tolist() == ["007", "007"]
    assert df["SessionId"].tolist() == ["01", "01"]
    assert df["ItemId"].tolist() == ["0042", "43"]


def test_yoochoose_raw_clicks(tmp_path: Path) -> None:
    text = (
        "1,2014-04-07T10:51:09.277Z,214536502,0\n"
        "1,2014-04-07T10:54:09.868Z,214536500,0\n"
        "2,2014-04-07T13:56:37.614Z,214662742,S\n"
    )
    df = load_clicks(_write(tmp_path / "yoochoose-clicks.dat", text))
    assert df["SessionId"].tolist() == ["1", "1", "2"]
    assert df["ItemId"].tolist() == ["214536502", "214536500", "214662742"]
    expected = pd.Timestamp("2014-04-07T10:51:09.277Z").timestamp()
    assert df["Time"].iloc[0] == pytest.approx(expected, abs=1e-3)
    assert df["Time"].iloc[1] - df["Time"].iloc[0] == pytest.approx(180.591, abs=1e-3)


def test_yoochoose_detected_without_dat_suffix_and_gzipped(tmp_path: Path) -> None:
    text = "1,2014-04-07T10:51:09.277Z,214536502,0\n1,2014-04-07T10:54:09Z,5,0\n"
    df = load_clicks(_write(tmp_path / "clicks.gz", text, gz=True))
    assert df["ItemId"].tolist() == ["214536502", "5"]


def test_yoochoose_bad_timestamp_line_number(tmp_path: Path) -> None:
    text = "1,2014-04-07T10:51:09.277Z,1,0\n1,2014-04-07T10:52:00Z,2,0\n2,yesterday,3,0\n"
    with pytest.raises(DataError, match=r"line 3: cannot parse Time value 'yesterday'"):
        load_clicks(_write(tmp_path / "c.dat", text))


def test_csv_with_column_map_and_iso_times(tmp_path: Path) -> None:
    text = (
        "ts,sess,product,extra\n2024-01-01T00:00:00Z,s1,p1,x\n2024-01-01T00:01:00+00:00,s1,p2,y\n"
    )
    df = load_clicks(
        _write(tmp_path / "c.csv", text),
        column_map={"SessionId": "sess", "ItemId": "product", "Time": "ts"},
    )
    assert list(df.columns) == ["SessionId", "ItemId", "Time"]
    assert df["Time"].tolist() == [1704067200.0, 1704067260.0]
    assert df["ItemId"].tolist() == ["p1", "p2"]


def test_tsv_with_column_map_and_explicit_format(tmp_path: Path) -> None:
    text = "s\ti\tt\nA\tB\t1\n"
    df = load_clicks(
        _write(tmp_path / "weird.log", text),
        column_map={"SessionId": "s", "ItemId": "i", "Time": "t"},
        fmt="tsv",
    )
    assert df.iloc[0].tolist() == ["A", "B", 1.0]


def test_parquet_with_numeric_ids_and_datetime_time(tmp_path: Path) -> None:
    raw = pd.DataFrame(
        {
            "sess": np.array([5, 5, 6], dtype=np.int64),
            "item": np.array([1.0, 2.0, 3.0]),
            "when": pd.to_datetime(
                ["2024-01-01", "2024-01-01 00:00:10", "2024-01-02"], format="ISO8601"
            ),
            "UserId": ["u", "u", "v"],
        }
    )
    path = tmp_path / "c.parquet"
    raw.to_parquet(path)
    df = load_clicks(path, column_map={"SessionId": "sess", "ItemId": "item", "Time": "when"})
    assert df["SessionId"].tolist() == ["5", "5", "6"]
    assert df["ItemId"].tolist() == ["1", "2", "3"]  # integral floats are not "1.0"
    assert df["UserId"].tolist() == ["u", "u", "v"]
    assert df["Time"].tolist() == [1704067200.0, 1704067210.0, 1704153600.0]


def test_missing_columns_are_named(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.tsv", "SessionId\tProduct\tTime\n1\t2\t3\n")
    with pytest.raises(DataError, match=r"missing column\(s\): ItemId;"):
        load_clicks(path)
    with pytest.raises(DataError, match=r"Time \(mapped from 'ts'\)"):
        load_clicks(path, column_map={"ItemId": "Product", "Time": "ts"})


def test_unparseable_time_gives_line_number(tmp_path: Path) -> None:
    text = "SessionId\tItemId\tTime\n1\t10\t1\n1\t11\t2\n2\t12\tabc\n"
    with pytest.raises(DataError, match=r"line 4: cannot parse Time value 'abc'"):
        load_clicks(_write(tmp_path / "a.tsv", text))


def test_too_many_fields_gives_line_number(tmp_path: Path) -> None:
    text = "SessionId\tItemId\tTime\n1\t10\t1\n1\t11\t2\t9\n"
    with pytest.raises(DataError, match=r"line 3: expected 3 fields, found 4"):
        load_clicks(_write(tmp_path / "a.tsv", text))


def test_missing_field_gives_line_number_after_a_blank_line(tmp_path: Path) -> None:
    text = "SessionId\tItemId\tTime\n1\t10\t1\n\n1\t\t3\n"
    with pytest.raises(DataError, match=r"line 4: missing value for ItemId"):
        load_clicks(_write(tmp_path / "a.tsv", text))


def test_empty_inputs(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="empty input"):
        load_clicks(_write(tmp_path / "zero.tsv", ""))
    with pytest.raises(DataError, match="empty input"):
        load_clicks(_write(tmp_path / "header.tsv", "SessionId\tItemId\tTime\n"))
    with pytest.raises(DataError, match="empty input"):
        load_clicks(_write(tmp_path / "header.tsv.gz", "SessionId\tItemId\tTime\n", gz=True))
    with pytest.raises(DataError, match="no such file"):
        load_clicks(tmp_path / "nope.tsv")


def test_load_keeps_row_order(tmp_path: Path) -> None:
    text = "SessionId\tItemId\tTime\n2\ta\t5\n1\tb\t9\n2\tc\t1\n"
    df = load_clicks(_write(tmp_path / "a.tsv", text))
    assert df["ItemId"].tolist() == ["a", "b", "c"]


# ----------------------------------------------------------------------------- preprocessing


def test_preprocess_removes_consecutive_repeats_in_time_order() -> None:
    # rows are not time-sorted: in time order session s is x x y x (t=1,2,3,4)
    df = _frame([("s", "x", 2), ("s", "y", 3), ("s", "x", 1), ("s", "x", 4)])
    out = preprocess(df, min_item_support=1, min_session_length=1)
    # the t=2 'x' repeats t=1 and goes; the t=4 'x' follows 'y' and stays; order kept
    assert out["Time"].tolist() == [3.0, 1.0, 4.0]


def test_preprocess_iterates_until_stable() -> None:
    rows = [
        # support: r 2, a 3, z 6, q 3; min support 3, min length 2
        ("a", "r", 1), ("a", "z", 2),
        ("b", "a", 3), ("b", "r", 4),
        ("c", "a", 5), ("c", "z", 6),
        ("d", "a", 7), ("d", "z", 8),
        ("e", "z", 9), ("e", "q", 10),
        ("f", "q", 11), ("f", "z", 12),
        ("g", "q", 13), ("g", "z", 14),
    ]  # fmt: skip
    out = preprocess(_frame(rows), min_item_support=3, min_session_length=2)
    # r (2 events) goes -> a: (z), b: (a) too short -> a has support 2 -> c, d lose 'a' ->
    # single-event sessions a, c, d go -> only z, q sessions e, f, g remain
    assert sorted(out["SessionId"].unique()) == ["e", "f", "g"]
    assert out["ItemId"].value_counts().to_dict() == {"z": 3, "q": 3}
    assert out["SessionId"].tolist() == ["e", "e", "f", "f", "g", "g"]


def test_preprocess_repeat_created_by_filtering_is_removed() -> None:
    # x r x: dropping rare r leaves x x, a consecutive repeat -> session too short
    rows = [("s", "x", 1), ("s", "r", 2), ("s", "x", 3), ("t", "x", 4), ("t", "y", 5)]
    rows += [("u", "y", 6), ("u", "x", 7)]
    out = preprocess(_frame(rows), min_item_support=2, min_session_length=2)
    assert sorted(out["SessionId"].unique()) == ["t", "u"]


def test_admit_new_items_needs_support_for_new_items_only() -> None:
    rows = [
        # k: a known item with one event; n: a new item with 3; j1..j3: junk, one event each
        ("a", "k", 1), ("a", "n", 2),
        ("b", "n", 3), ("b", "z", 4),
        ("c", "n", 5), ("c", "z", 6),
        ("d", "j1", 7), ("d", "j2", 8),
        ("e", "z", 9), ("e", "j3", 10), ("e", "z", 11),
    ]  # fmt: skip
    df = _frame(rows)
    out, left = admit_new_items(df, known=["z", "k"], min_support=3)
    # k stays with its one event; n (3 events) is admitted; d holds only junk and goes; in e,
    # dropping j3 makes z z a repeat, so e is one event and goes too
    assert sorted(out["ItemId"].unique()) == ["k", "n", "z"]
    assert sorted(out["SessionId"].unique()) == ["a", "b", "c"]
    assert left["min_support"] == 3 and left["items"] == 3 and left["item_events"] == 3
    assert left["events_dropped"] == 5 and sorted(left["examples"]) == ["j1", "j2", "j3"]
    # with nothing known (a first cycle), k needs support as well, and a goes with it
    out, left = admit_new_items(df, known=(), min_support=2)
    assert sorted(out["ItemId"].unique()) == ["n", "z"] and left["items"] == 4
    assert sorted(out["SessionId"].unique()) == ["b", "c"]
    # 1: everything preprocess keeps is admitted
    out, left = admit_new_items(df, known=(), min_support=1)
    assert len(out) == len(preprocess(df, 1, 2)) and left["items"] == 0


def test_split_by_time_on_hand_made_data() -> None:
    d = 86400.0
    rows = [
        ("old", "a", 0), ("old", "b", 10),
        ("old2", "b", d), ("old2", "c", d + 5),
        # starts before the cut (max - 1 day = 2d + 10) and ends after it: train
        ("cross", "a", 2 * d), ("cross", "c", 2 * d + 100),
        ("new", "a", 2.5 * d), ("new", "b", 2.5 * d + 1), ("new", "zz", 2.5 * d + 2),
        ("new2", "zz", 3 * d), ("new2", "a", 3 * d + 10),
    ]  # fmt: skip
    train, test = split_by_time(_frame(rows), days=1)
    assert sorted(train["SessionId"].unique()) == ["cross", "old", "old2"]
    # 'zz' is unknown in train: removed from 'new', and 'new2' is left with 1 event -> dropped
    assert test["SessionId"].tolist() == ["new", "new"]
    assert test["ItemId"].tolist() == ["a", "b"]
    # validation split inside train
    tr2, val = split_by_time(train, days=1)
    assert sorted(tr2["SessionId"].unique()) == ["old", "old2"]
    assert val["SessionId"].unique().tolist() == ["cross"]


def test_sessionize_by_gap() -> None:
    df = pd.DataFrame(
        {
            "UserId": ["u", "u", "v", "u", "u", "v"],
            "ItemId": ["1", "2", "3", "4", "5", "6"],
            "Time": [0.0, 100.0, 50.0, 2000.0, 2100.0, 51.0],
        }
    )
    out = sessionize(df, gap_seconds=1800)
    # u: 0, 100 | gap 1900 > 1800 | 2000, 2100 ; v: 50, 51
    assert out["SessionId"].tolist() == ["u:0", "u:0", "v:0", "u:1", "u:1", "v:0"]
    assert out["ItemId"].tolist() == df["ItemId"].tolist()
    # a gap exactly equal to the threshold does not split
    same = sessionize(df.assign(Time=[0.0, 1800.0, 0.0, 3600.0, 3601.0, 1.0]), 1800)
    assert same["SessionId"].nunique() == 2


def test_restrict_to_items_keeps_items_every_index_knows_then_sessions_of_two() -> None:
    test = _frame(
        [("s", "a", 1), ("s", "b", 2), ("s", "c", 3), ("t", "a", 1), ("t", "d", 2), ("u", "b", 5)],
        cols=("SessionId", "ItemId", "Time"),
    )
    # t loses d and is left with one event; u has one event from the start
    one = restrict_to_items(test, {"a": 0, "b": 1, "c": 2})
    assert one[["SessionId", "ItemId"]].values.tolist() == [["s", "a"], ["s", "b"], ["s", "c"]]
    # two indexes (the retrain gate: items both models know): c is unknown to the second
    both = restrict_to_items(test, {"a": 0, "b": 1, "c": 2}, ["a", "b", "d"])
    assert both["ItemId"].tolist() == ["a", "b"]
    assert restrict_to_items(test, {"a": 0}).empty


def test_filter_users_and_last_session_out() -> None:
    rows = []
    # user A: 3 sessions; user B: 1 session (dropped by min_sessions=2)
    for k, t in enumerate([0, 100, 200]):
        rows += [("A", f"A{k}", "x", t), ("A", f"A{k}", "y", t + 1)]
    rows += [("B", "B0", "x", 50), ("B", "B0", "y", 51)]
    rows += [("A", "A2", "new", 202)]  # only in A's last session: not in train
    df = _frame(rows, cols=("UserId", "SessionId", "ItemId", "Time"))
    f = filter_users(df, min_sessions=2, min_session_length=2, min_item_support=1)
    assert sorted(f["UserId"].unique()) == ["A"]
    train, test = split_last_session_out(f)
    assert sorted(train["SessionId"].unique()) == ["A0", "A1"]
    assert test["ItemId"].tolist() == ["x", "y"]  # 'new' removed: never seen in train


def test_missing_columns_in_processing_functions() -> None:
    with pytest.raises(DataError, match="UserId"):
        sessionize(pd.DataFrame({"ItemId": ["1"], "Time": [1.0]}), 10)
    with pytest.raises(DataError, match="SessionId"):
        preprocess(pd.DataFrame({"ItemId": ["1"], "Time": [1.0]}))


def test_too_few_fields_reports_the_missing_time(tmp_path: Path) -> None:
    text = "SessionId\tItemId\tTime\n1\t10\t1\n1\t11\n"
    with pytest.raises(DataError, match=r"line 3: missing value for Time"):
        load_clicks(_write(tmp_path / "a.tsv", text))
