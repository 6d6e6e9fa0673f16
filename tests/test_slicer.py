"""3D Slicer line markups: round trip with the lesions table, Slicer's own conventions (LPS, default names),
un-blinding with the reading key, and clear errors on bad files."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from virtual_contrast.annotations import LESION_COLUMNS, validate_lesions
from virtual_contrast.cli import main
from virtual_contrast.io import InputError
from virtual_contrast.reader import slicer


def _lesions() -> pd.DataFrame:
    rows = [
        ("P01", "R1", "ref", 10.5, -20.25, 33.0, 12.0, 8.5),
        ("P01", "R1", "ref", -40.0, 5.0, 10.0, 4.0, 3.0),
        ("P01", "R2", "vir", 11.0, -20.0, 33.5, 11.0, 9.0),
        ("P02", "R1", "low", 0.0, 0.0, 0.0, 25.0, 25.0),
    ]
    return pd.DataFrame(rows, columns=list(LESION_COLUMNS))


def test_round_trip_lesions_markups_lesions(tmp_path) -> None:
    lesions = _lesions()
    written = slicer.lesions_to_markups(lesions, tmp_path)
    assert len(written) == 2 * len(lesions)
    back = []
    for (patient, reader, modality), _ in lesions.groupby(["patient", "reader", "modality"]):
        folder = tmp_path / reader / patient / modality
        back.append(
            slicer.markups_to_lesions(folder, patient=patient, reader=reader, modality=modality)
        )
    back = pd.concat(back, ignore_index=True)
    key = ["patient", "reader", "modality", "long_axis_mm"]
    a = lesions.sort_values(key).reset_index(drop=True)
    b = back.sort_values(key).reset_index(drop=True)[list(LESION_COLUMNS)]
    pd.testing.assert_frame_equal(a, b, check_exact=False, atol=1e-9)
    validate_lesions(back)  # a valid lesions table


def test_written_files_are_slicer_line_markups_in_lps(tmp_path) -> None:
    path = slicer.write_line_markup(
        tmp_path / "a.mrk.json", "L", np.array([1.0, 2.0, 3.0]), np.array([5.0, 2.0, 3.0])
    )
    doc = json.loads(path.read_text())
    markup = doc["markups"][0]
    assert doc["@schema"].endswith("markups-schema-v1.0.3.json#")
    assert markup["type"] == "Line" and markup["coordinateSystem"] == "LPS"
    assert markup["controlPoints"][0]["position"] == [-1.0, -2.0, 3.0]  # RAS (1, 2, 3) in LPS
    assert markup["measurements"][0]["value"] == pytest.approx(4.0)


def _slicer_file(path, points, *, system="LPS", name=None, kind="Line"):
    """A file as Slicer 5 saves a line (trimmed): default name, LPS control points."""
    markup = {
        "type": kind,
        "coordinateSystem": system,
        "coordinateUnits": "mm",
        "locked": False,
        "labelFormat": "%N-%d",
        "controlPoints": [
            {
                "id": str(i + 1),
                "label": f"L-{i + 1}",
                "position": list(p),
                "positionStatus": "defined",
            }
            for i, p in enumerate(points)
        ],
    }
    if name is not None:
        markup["name"] = name
    path.write_text(json.dumps({"@schema": slicer.SCHEMA, "markups": [markup]}))
    return path


def test_default_named_lines_pair_by_geometry_and_lps_becomes_ras(tmp_path) -> None:
    # lesion A at RAS (10, 20, 30): long axis 12 mm along x, short 6 mm along y; lesion B far away
    a_long = _slicer_file(tmp_path / "L.mrk.json", [(-4, -20, 30), (-16, -20, 30)])  # LPS
    a_short = _slicer_file(tmp_path / "L_1.mrk.json", [(-10, -17, 30), (-10, -23, 30)])
    b_short = _slicer_file(tmp_path / "L_2.mrk.json", [(50, 0, 0), (50, 4, 0)], system="RAS")
    b_long = _slicer_file(tmp_path / "L_3.mrk.json", [(46, 2, 0), (54, 2, 0)], system="RAS")
    table = slicer.markups_to_lesions(
        [a_short, b_long, a_long, b_short], patient="P", reader="R", modality="vir"
    )
    table = table.sort_values("x_mm").reset_index(drop=True)
    np.testing.assert_allclose(table.loc[0, ["x_mm", "y_mm", "z_mm"]].to_numpy(float), [10, 20, 30])
    assert (table.loc[0, "long_axis_mm"], table.loc[0, "short_axis_mm"]) == (12.0, 6.0)
    np.testing.assert_allclose(table.loc[1, ["x_mm", "y_mm", "z_mm"]].to_numpy(float), [50, 2, 0])
    assert (table.loc[1, "long_axis_mm"], table.loc[1, "short_axis_mm"]) == (8.0, 4.0)


def test_import_annotations_unblinds_with_the_key(tmp_path) -> None:
    key = pd.DataFrame(
        [
            ("case-123456", "R1", 1, 1, "P01", "low"),
            ("case-654321", "R1", 1, 2, "P02", "vir"),
        ],
        columns=["case_id", "reader", "phase", "order", "patient", "modality"],
    )
    folder = tmp_path / "annotations" / "case-123456"
    folder.mkdir(parents=True)
    slicer.write_line_markup(
        folder / "x-long.mrk.json", "x-long", np.array([0.0, 0, 0]), np.array([10.0, 0, 0])
    )
    slicer.write_line_markup(
        folder / "x-short.mrk.json", "x-short", np.array([5.0, -3, 0]), np.array([5.0, 3, 0])
    )
    form = tmp_path / "form.tsv"
    pd.DataFrame(
        {
            "phase": [1, 1],
            "order": [1, 2],
            "case_id": ["case-123456", "case-654321"],
            "quality": [3, 4],
            "reading_time_s": [100, 80],
        }
    ).to_csv(form, sep="\t", index=False)
    lesions, reads = slicer.import_annotations(tmp_path / "annotations", key, forms=[form])
    assert lesions[["patient", "reader", "modality"]].values.tolist() == [["P01", "R1", "low"]]
    assert lesions.loc[0, "long_axis_mm"] == 10.0 and lesions.loc[0, "x_mm"] == 5.0
    assert reads.set_index("patient").loc["P02", "modality"] == "vir"  # read without lesions

    # a folder that is no case of the key is refused (a typo would silently drop a read)
    (tmp_path / "annotations" / "case-999999").mkdir()
    with pytest.raises(InputError, match="case-999999 are not case ids"):
        slicer.import_annotations(tmp_path / "annotations", key)


def test_cli_export_and_import(tmp_path, capsys) -> None:
    lesions = _lesions()
    csv = tmp_path / "lesions.csv"
    lesions.to_csv(csv, index=False)
    assert main(["export-markups", "--lesions", str(csv), "--out", str(tmp_path / "mrk")]) == 0
    # re-import one read through the blinded layout: annotations/<case_id>/
    key = pd.DataFrame(
        [("case-100001", "R1", 1, 1, "P02", "low")],
        columns=["case_id", "reader", "phase", "order", "patient", "modality"],
    )
    key.to_csv(tmp_path / "key.tsv", sep="\t", index=False)
    (tmp_path / "ann").mkdir()
    (tmp_path / "mrk" / "R1" / "P02" / "low").rename(tmp_path / "ann" / "case-100001")
    out = tmp_path / "imported.csv"
    assert (
        main(
            [
                "import-markups",
                "--annotations",
                str(tmp_path / "ann"),
                "--key",
                str(tmp_path / "key.tsv"),
                "--lesions",
                str(out),
            ]
        )
        == 0
    )
    got = pd.read_csv(out)
    assert got.loc[0, "long_axis_mm"] == pytest.approx(25.0) and got.loc[0, "patient"] == "P02"


@pytest.mark.parametrize(
    "content,message",
    [
        ("{not json", "not a valid JSON"),
        ('{"@schema": "x"}', "no 'markups' list"),
        (None, "is a 'Fiducial', not a 'Line'"),
    ],
)
def test_bad_markup_files_are_clear_errors(tmp_path, content, message) -> None:
    path = tmp_path / "bad.mrk.json"
    if content is None:
        _slicer_file(path, [(0, 0, 0)], kind="Fiducial", name="F")
    else:
        path.write_text(content)
    with pytest.raises(InputError, match=message) as err:
        slicer.read_markups(path)
    assert "bad.mrk.json" in str(err.value)


def test_line_with_one_point_and_lone_lines_are_errors(tmp_path) -> None:
    one = _slicer_file(tmp_path / "one.mrk.json", [(0, 0, 0)])
    with pytest.raises(InputError, match="1 placed control points, expected 2"):
        slicer.read_markups(one)
    a = _slicer_file(tmp_path / "a.mrk.json", [(0, 0, 0), (10, 0, 0)])
    b = _slicer_file(tmp_path / "b.mrk.json", [(50, 0, 0), (60, 0, 0)])
    with pytest.raises(InputError, match="cross no other line"):
        slicer.markups_to_lesions([a, b], patient="P", reader="R", modality="low")
    only_long = _slicer_file(tmp_path / "c.mrk.json", [(0, 0, 0), (10, 0, 0)], name="les1-long")
    with pytest.raises(InputError, match="no short axis line"):
        slicer.markups_to_lesions([only_long], patient="P", reader="R", modality="low")
