"""The reading tool without a browser: a session's results files, resuming, corrections, crashes between
writes, bad requests, and the server refusing anything outside the session."""

from __future__ import annotations

import json
import os
import threading
import urllib.error
import urllib.request

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from virtual_contrast.annotations import LESION_COLUMNS, load_lesions, load_reads
from virtual_contrast.cli import main
from virtual_contrast.io import InputError, write_table
from virtual_contrast.reader import protocol, viewer
from virtual_contrast.reader.session import ReadingSession, session_lock
from virtual_contrast.reader.stats import reader_stats

PATIENTS = ["vc001", "vc002", "vc003"]
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
AFFINE[:3, 3] = [-8, -8, -8]


def _line(start, end, slice_index=4):
    return {
        "start_mm": list(map(float, start)),
        "end_mm": list(map(float, end)),
        "view": {"sliceType": 0, "sliceIndex": slice_index, "slicePosition": 0.5},
    }


# A lesion centred at (1, 2, 3): long axis 10 mm along x, short axis 4 mm along y.
LESION = {"long": _line((-4, 2, 3), (6, 2, 3)), "short": _line((1, 0, 3), (1, 4, 3))}


@pytest.fixture
def study(tmp_path):
    """Reading lists of 3 patients for R1 (also the reference reader) and R2, with 8³ images."""
    for patient in PATIENTS:
        for modality in ("low", "vir", "ref", "pre", "flair"):
            img = nib.Nifti1Image(np.random.default_rng(0).random((8, 8, 8), np.float32), AFFINE)
            img.header["descrip"] = f"{patient} {modality}".encode()
            nib.save(img, tmp_path / f"{patient}_{modality}.nii.gz")
    lists = tmp_path / "study" / "reading_lists"
    key_path = tmp_path / "study" / protocol.KEY_NAME
    key = protocol.make_reading_lists(
        PATIENTS, ["R1", "R2"], out_dir=lists, key_path=key_path, reference_reader="R1", seed=3
    )
    pattern = str(tmp_path / "{patient}_{modality}.nii.gz")
    protocol.export_reading_images(
        key, lists, image_pattern=pattern, pre_pattern=pattern, flair_pattern=pattern
    )
    return {"lists": lists, "key_path": key_path, "key": key, "out": tmp_path / "readings"}


def _session(study, reader="R1", phase=1):
    return ReadingSession(study["lists"], study["key_path"], reader, study["out"], phase=phase)


def test_reads_land_in_csv_files_that_reader_stats_reads(study) -> None:
    s1 = _session(study)
    first, second, third = (c.case_id for c in s1.cases)
    s1.save_read(first, [LESION], 4, 12.5)
    s1.save_read(second, [], 2, 3.0)  # no lesion: a read all the same
    lesions = load_lesions(study["out"] / "lesions.csv")
    reads = load_reads(study["out"] / "reads.csv")
    case = s1.case(first)
    assert lesions[["patient", "reader", "modality"]].values.tolist() == [
        [case.patient, "R1", case.modality]
    ]
    row = lesions.iloc[0]
    assert (row.x_mm, row.y_mm, row.z_mm, row.long_axis_mm, row.short_axis_mm) == (
        1.0,
        2.0,
        3.0,
        10.0,
        4.0,
    )
    assert reads["quality"].tolist() == [4, 2] and reads["reading_time_s"].tolist() == [12.5, 3.0]
    assert s1.summary()["n_read"] == 2
    # reopening resumes at the first unread case, in the list's order
    again = _session(study)
    assert [c["read"] for c in again.summary()["cases"]] == [True, True, False]
    assert again.summary()["cases"][2]["case_id"] == third


def test_a_corrected_case_replaces_its_rows_and_adds_its_time(study) -> None:
    s1 = _session(study)
    first = s1.cases[0].case_id
    s1.save_read(first, [LESION, LESION], 3, 10.0)
    s1.save_read(first, [LESION], 5, 4.0)
    lesions = pd.read_csv(study["out"] / "lesions.csv")
    reads = pd.read_csv(study["out"] / "reads.csv")
    assert len(lesions) == 1 and len(reads) == 1
    assert reads.loc[0, "quality"] == 5 and reads.loc[0, "reading_time_s"] == 14.0
    assert s1.record(first)["lesions"] == [LESION]


def test_sessions_of_other_readers_share_the_files_and_keep_each_others_rows(study) -> None:
    s1, s2 = _session(study, "R1"), _session(study, "R2")
    s1.save_read(s1.cases[0].case_id, [LESION], 4, 5.0)
    s2.save_read(s2.cases[0].case_id, [LESION], 3, 6.0)
    s1.save_read(s1.cases[0].case_id, [], 4, 1.0)
    reads = load_reads(study["out"] / "reads.csv")
    lesions = load_lesions(study["out"] / "lesions.csv")
    assert sorted(reads["reader"]) == ["R1", "R2"]
    assert lesions["reader"].tolist() == ["R2"]


def test_a_crash_between_the_writes_is_repaired_on_reopening(study) -> None:
    s1 = _session(study)
    s1.save_read(s1.cases[0].case_id, [LESION], 4, 5.0)
    (study["out"] / "reads.csv").unlink()  # as if the process died before the last rename
    (study["out"] / "lesions.csv").write_text(",".join(LESION_COLUMNS) + "\n")
    _session(study)
    assert len(load_reads(study["out"] / "reads.csv")) == 1
    assert len(load_lesions(study["out"] / "lesions.csv")) == 1
    assert not list(study["out"].glob(".*.csv")), "no temporary file is left"


def test_reference_phase_is_the_only_unblinded_one_and_a_full_study_runs_reader_stats(
    study, tmp_path
) -> None:
    key = study["key"]
    for (reader, phase), _ in key.groupby(["reader", "phase"]):
        session = _session(study, reader, phase)
        assert session.blinded == (phase != 3)
        for case in session.cases:
            session.save_read(case.case_id, [LESION], 3, 1.0)
        session.close()
    tables = reader_stats(
        load_lesions(study["out"] / "lesions.csv"),
        load_reads(study["out"] / "reads.csv"),
        tmp_path / "stats",
    )
    detection = tables["detection"]
    # every reader marked the same lesion on every image: all detected, no false positive
    assert set(detection["sensitivity"]) == {1.0} and set(detection["fdr"]) == {0.0}


def test_closing_freezes_the_session_and_the_default_phase_moves_on(study) -> None:
    s1 = ReadingSession(study["lists"], study["key_path"], "R1", study["out"])
    assert s1.phase == 1
    s1.close()
    with pytest.raises(InputError, match="closed"):
        s1.save_read(s1.cases[0].case_id, [], 3, 1.0)
    assert ReadingSession(study["lists"], study["key_path"], "R1", study["out"]).phase == 2


@pytest.mark.parametrize(
    ("lesions", "quality", "elapsed", "message"),
    [
        ([], 0, 1.0, "quality"),
        ([], 6, 1.0, "quality"),
        ([], "3", 1.0, "quality"),
        ([], True, 1.0, "quality"),
        ([], 3, -1.0, "reading time"),
        ([], 3, float("nan"), "reading time"),
        ([{"long": LESION["long"]}], 3, 1.0, "long and a short"),
        ([{"long": LESION["long"], "short": _line((0, 0, 0), (0, 0, 0))}], 3, 1.0, "zero length"),
        ([{"long": LESION["long"], "short": _line((0, 0), (1, 1))}], 3, 1.0, "3 finite"),
    ],
)
def test_bad_reads_are_refused_and_write_nothing(study, lesions, quality, elapsed, message) -> None:
    s1 = _session(study)
    with pytest.raises(InputError, match=message):
        s1.save_read(s1.cases[0].case_id, lesions, quality, elapsed)
    assert not (study["out"] / "reads.csv").exists()


def test_bad_session_arguments_are_one_clear_line(study, capsys) -> None:
    with pytest.raises(InputError, match="reader 'R9' is not in the key"):
        _session(study, "R9")
    with pytest.raises(InputError, match="no phase 3"):
        _session(study, "R2", 3)
    case = study["key"].iloc[0]
    image = protocol.case_folder(
        study["lists"], case.reader, case.phase
    ) / protocol.CASE_IMAGE.format(case_id=case.case_id)
    image.unlink()
    args = ["read", "--lists", str(study["lists"]), "--reader", case.reader]
    assert main([*args, "--phase", str(case.phase)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and case.case_id in err and "missing" in err


def test_new_reading_lists_do_not_mix_with_an_old_session(study) -> None:
    _session(study)
    key = study["key"].copy()
    key.loc[key.index[0], "case_id"] = "case-999999"
    write_table(key, study["key_path"])
    old = study["key"].iloc[0]
    folder = protocol.case_folder(study["lists"], old.reader, old.phase)
    for path in folder.glob(f"{old.case_id}*"):
        path.rename(path.with_name(path.name.replace(old.case_id, "case-999999")))
    with pytest.raises(InputError, match="have changed since this session started"):
        _session(study, old.reader, old.phase)


def test_a_session_is_served_by_one_server_at_a_time(study) -> None:
    with session_lock(_session(study)):
        with pytest.raises(InputError, match="already open in another process"):
            with session_lock(_session(study)):
                pass
    with session_lock(_session(study)):  # free again once the first server stopped
        pass


# ------------------------------------------------------------------------------------------------- server
@pytest.fixture
def server(study):
    if not viewer.VIEWER_PATH.exists():
        msg = f"the NiiVue viewer is not installed ({viewer.VIEWER_PATH}: make viewer)"
        if os.environ.get("VC_REQUIRE_BROWSER", "") == "1":
            pytest.fail(msg + " and VC_REQUIRE_BROWSER=1")
        pytest.skip(msg)
    from virtual_contrast.reader.server import serve

    srv = serve(_session(study), port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_the_server_serves_only_the_session_s_own_cases(server, study) -> None:
    url = server.url
    mine = server.session.cases[0].case_id
    key = study["key"]
    others = key[(key["reader"] != "R1") | (key["phase"] != 1)]["case_id"]
    assert _get(url)[0] == 200 and _get(url + "niivue.js")[0] == 200
    status, body = _get(url + f"image/{mine}/post.nii")
    assert status == 200
    image = nib.Nifti1Image.from_bytes(body)  # uncompressed: a compressed size tells the noise
    assert image.header["descrip"].item() == b"", "the source's header text is not served"
    assert image.get_data_dtype() == np.uint16  # a reading copy
    assert np.allclose(image.affine, AFFINE) and image.shape == (8, 8, 8)
    for other in others:
        assert _get(url + f"image/{other}/post.nii")[0] == 403
        assert _get(url + f"api/case/{other}")[0] == 403
    assert _get(url.replace(server.token, "x" * len(server.token)))[0] == 403
    assert _get(url + f"image/{mine}/../../../{protocol.KEY_NAME}")[0] in (403, 404)
    assert _get(url + f"image/{mine}/key.nii")[0] == 404
    assert _get(url + f"image/{mine}/post.nii.gz")[0] == 404
    host = url.split("/s/")[0]
    assert _get(host + "/")[0] == 403 and _get(host + "/favicon.ico")[0] == 403


def test_the_server_saves_a_read_and_refuses_bad_requests(server, study) -> None:
    url = server.url
    mine = server.session.cases[0].case_id
    status, reply = _post(url + f"api/case/{mine}", b"not json")
    assert status == 400
    status, reply = _post(url + f"api/case/{mine}", json.dumps({"quality": 9}).encode())
    assert status == 400 and "quality" in reply["error"]
    body = {"lesions": [LESION], "quality": 4, "elapsed_s": 7.5}
    status, reply = _post(url + f"api/case/{mine}", json.dumps(body).encode())
    assert status == 200 and reply["n_read"] == 1
    assert json.loads(_get(url + f"api/case/{mine}")[1])["record"]["lesions"] == [LESION]
    status, reply = _post(url + "api/close", b"{}")
    assert status == 200 and reply["closed"]
    status, reply = _post(url + f"api/case/{mine}", json.dumps(body).encode())
    assert status == 409 and "closed" in reply["error"]


# ------------------------------------------------------------------ the readers' answers (issue 25, part 3)
def test_every_record_is_flushed_to_the_disk_before_its_rename(study, monkeypatch) -> None:
    """A power cut must not leave an empty record under its final name: fsync, then rename, then the folder."""
    import virtual_contrast.io as io_module

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(
        io_module.os,
        "fsync",
        lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))) or real_fsync(fd),
    )
    monkeypatch.setattr(
        io_module.os,
        "replace",
        lambda src, dst: events.append(("replace", str(src), str(dst))) or real_replace(src, dst),
    )
    s1 = _session(study)
    events.clear()
    s1.save_read(s1.cases[0].case_id, [LESION], 4, 5.0)
    record = str((s1.state_dir / f"{s1.cases[0].case_id}.json").resolve())
    renames = [e for e in events if e[0] == "replace"]
    assert {e[2] for e in renames} >= {record, str(study["out"] / "reads.csv")}
    for k, event in enumerate(events):
        if event[0] == "replace":
            # the renamed file was flushed just before, and its folder just after
            assert events[k - 1] == ("fsync", str(os.path.realpath(event[1]))), events[
                k - 1 : k + 1
            ]
            assert events[k + 1] == ("fsync", os.path.realpath(os.path.dirname(event[2])))


def test_a_damaged_record_is_named_skipped_and_never_blocks_the_session(study, caplog) -> None:
    s1 = _session(study)
    first, second = s1.cases[0].case_id, s1.cases[1].case_id
    s1.save_read(first, [LESION], 4, 5.0)
    s1.save_read(second, [], 3, 2.0)
    damaged = s1.state_dir / f"{first}.json"
    damaged.write_bytes(b"")  # what a power cut leaves without fsync
    with caplog.at_level("WARNING"):
        again = _session(study)  # opens: the damaged record does not stop it
    assert str(damaged) in caplog.text and "damaged" in caplog.text
    assert caplog.text.count(str(damaged)) == 1, "named once, not at every request"
    assert again.read_case_ids() == [second] and again.record(first) is None
    assert [c["read"] for c in again.summary()["cases"]][:2] == [False, True]
    # the case is read again, which replaces the damaged file
    again.save_read(first, [LESION], 5, 1.0)
    assert again.record(first)["quality"] == 5
    # a record that is JSON but not a read is damaged too
    damaged.write_text('{"lesions": "x"}')
    assert _session(study).record(first) is None


def test_a_session_refuses_images_changed_since_its_first_opening_unless_told(
    study, capsys
) -> None:
    s1 = _session(study)
    s1.save_read(s1.cases[0].case_id, [LESION], 4, 5.0)
    case = s1.cases[1]
    # the reading lists are written again (a retraining) under the same case ids
    original = case.images["post"].read_bytes()
    img = nib.load(case.images["post"])
    changed = np.asanyarray(img.dataobj).astype(np.uint16)
    changed[changed > 0] += 7
    nib.save(nib.Nifti1Image(changed, img.affine, img.header), case.images["post"])
    with pytest.raises(InputError, match=rf"images .* have changed .*{case.case_id} post"):
        _session(study)
    args = ["read", "--lists", str(study["lists"]), "--reader", "R1", "--phase", "1"]
    assert main([*args, "--out", str(study["out"]), "--port", "-1"]) == 2
    assert "--allow-changed-images" in capsys.readouterr().err
    told = ReadingSession(
        study["lists"], study["key_path"], "R1", study["out"], phase=1, allow_changed_images=True
    )
    assert told.read_case_ids() == [s1.cases[0].case_id]
    _session(study)  # the new images are recorded: the next opening goes on
    case.images["post"].write_bytes(original)
    with pytest.raises(InputError, match="have changed"):
        _session(study)


@pytest.mark.parametrize("reader", ["../../x", "R1/..", ".hidden", "a b"])
def test_reader_names_in_the_key_are_checked_like_subject_ids(study, tmp_path, reader) -> None:
    key = study["key"].copy()
    key.loc[key["reader"] == "R2", "reader"] = reader
    write_table(key, study["key_path"])
    with pytest.raises(InputError, match=r"line \d+: reader name .* must be letters"):
        _session(study, "R1")
    with pytest.raises(InputError, match="reader name"):
        _session(study, reader)
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob("**/sessions/*phase*"))


def test_a_line_beyond_any_head_is_refused(study) -> None:
    s1 = _session(study)
    for start, end, message in (
        ((0, 0, 0), (1e308, 0, 0), "farther than"),
        ((-300, 0, 0), (300, 0, 0), "longer than any line"),
    ):
        lesion = {"long": _line(start, end), "short": LESION["short"]}
        with pytest.raises(InputError, match=message):
            s1.save_read(s1.cases[0].case_id, [lesion], 3, 1.0)
    assert not (study["out"] / "lesions.csv").exists()


def test_the_page_gets_no_path_of_the_server(server, study) -> None:
    status, body = _get(server.url + "api/session")
    text = body.decode()
    assert status == 200
    summary = json.loads(text)
    assert not {"lesions_csv", "reads_csv"} & set(summary)
    for part in (str(study["out"]), str(study["lists"]), str(study["out"].parent), "/"):
        assert part not in text.replace("</", ""), part
    status, reply = _post(server.url + "api/close", b"{}")
    assert status == 200 and "/" not in json.dumps(reply)


def _raw_request(server, head: str, body: bytes = b"", *, shut: bool = True) -> tuple[int, dict]:
    """Send bytes as they are (headers a browser would never send); the status and JSON of the answer."""
    import socket

    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=20) as conn:
        conn.sendall(head.encode() + b"\r\n\r\n" + body)
        if shut:
            conn.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    assert data, "the server dropped the connection without an answer"
    header, _, payload = data.partition(b"\r\n\r\n")
    status = int(header.split()[1])
    return status, json.loads(payload) if payload else {}


def test_every_malformed_request_gets_a_4xx_answer(server, study) -> None:
    path = server.url.split(":", 2)[2].split("/", 1)[1]
    case = server.session.cases[0].case_id
    post = f"POST /{path}api/case/{case} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
    # a negative length once read the whole stream (past the 1 MB cap) until the client closed it
    status, reply = _raw_request(server, post + "\r\nContent-Length: -1", b'{"quality": 3}')
    assert status == 400 and "Content-Length" in reply["error"]
    status, reply = _raw_request(server, post + "\r\nContent-Length: abc", b"{}")
    assert status == 400 and "Content-Length" in reply["error"]
    # refused before the body is read (none is sent: the server closes the connection at once)
    status, reply = _raw_request(server, post + "\r\nContent-Length: 2000000", shut=False)
    assert status == 413
    status, reply = _raw_request(server, post, b"")
    assert status == 411
    nested = b"[" * 100_000 + b"]" * 100_000
    status, reply = _raw_request(server, post + f"\r\nContent-Length: {len(nested)}", nested)
    assert status == 400 and "nests deeper" in reply["error"]
    short = f"{post}\r\nContent-Length: 50"
    status, reply = _raw_request(server, short, b"{}")
    assert status == 400 and "shorter" in reply["error"]
    put = f"PUT /{path}api/case/{case} HTTP/1.1\r\nHost: x\r\nContent-Length: 2"
    status, reply = _raw_request(server, put, b"{}")
    assert status == 405 and "PUT" in reply["error"]
    absurd = {"lesions": [{"long": _line((0, 0, 0), (1e308, 0, 0)), "short": LESION["short"]}]}
    status, reply = _post(
        server.url + f"api/case/{case}",
        json.dumps(absurd | {"quality": 3, "elapsed_s": 1}).encode(),
    )
    assert status == 400 and "farther than" in reply["error"]
    assert not (study["out"] / "lesions.csv").exists()
    assert _get(server.url + "api/session")[0] == 200, "the server still answers"


def test_a_full_disk_is_answered_not_dropped(server, study, monkeypatch) -> None:
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(server.session, "save_read", full)
    case = server.session.cases[0].case_id
    body = json.dumps({"lesions": [], "quality": 3, "elapsed_s": 1.0}).encode()
    status, reply = _post(server.url + f"api/case/{case}", body)
    assert status == 507 and "disk is full" in reply["error"]
    monkeypatch.setattr(server.session, "save_read", lambda *a: 1 / 0)
    status, reply = _post(server.url + f"api/case/{case}", body)
    assert status == 500 and "ZeroDivisionError" in reply["error"]
    # an image of the lists that cannot be read: a 500 that names no path of the server
    image = server.session.cases[1].images["post"]
    image.write_bytes(b"not an image")
    status, raw = _get(server.url + f"image/{server.session.cases[1].case_id}/post.nii")
    reply = json.loads(raw)
    assert status == 500 and "cannot be read" in reply["error"] and "/" not in reply["error"], reply


def _uncertainty_maps(study) -> dict:
    folder = study["out"].parent / "maps"
    folder.mkdir(exist_ok=True)
    maps = {}
    for patient in PATIENTS:
        data = np.random.default_rng(7).random((8, 8, 8), np.float32) * 0.1 + 0.01
        maps[patient] = folder / f"{patient}_uncertainty.nii.gz"
        nib.save(nib.Nifti1Image(data, AFFINE), maps[patient])
    return maps


def _served(session, study) -> dict[str, int]:
    """The status of image/<case>/uncertainty.nii for every case of the session, through a live server."""
    from virtual_contrast.reader.server import serve

    srv = serve(session, port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        assert _get(srv.url + "api/session")[0] == 200
        return {c.case_id: _get(srv.url + f"image/{c.case_id}/uncertainty.nii")[0]
                for c in session.cases}  # fmt: skip
    finally:
        srv.shutdown()
        srv.server_close()


def test_the_uncertainty_map_is_never_served_in_a_blinded_phase_only_in_a_review(study) -> None:
    if not viewer.VIEWER_PATH.exists():
        pytest.skip(f"the NiiVue viewer is not installed ({viewer.VIEWER_PATH}: make viewer)")
    maps = _uncertainty_maps(study)
    blinded = _session(study, reader="R2", phase=1)
    assert blinded.blinded and not blinded.review
    assert {c.modality for c in blinded.cases} >= {"vir"}
    # The blinded reading: no route serves the map, for any case (vir-T1c's included).
    assert set(_served(blinded, study).values()) == {404}
    assert not blinded.summary()["review"]
    # A review cannot open while the phase is read: the reader has not closed it.
    with pytest.raises(InputError, match="has not closed phase 1"):
        ReadingSession(study["lists"], study["key_path"], "R2", study["out"], phase=1,
                       review_maps=maps)  # fmt: skip
    # Closed, it opens as a review: the map on vir-T1c cases only, as a reading copy; no read is saved.
    blinded.close()
    review = ReadingSession(study["lists"], study["key_path"], "R2", study["out"], phase=1,
                            review_maps=maps)  # fmt: skip
    assert review.summary()["review"]
    served = _served(review, study)
    for case in review.cases:
        assert served[case.case_id] == (200 if case.modality == "vir" else 404), case.modality
    with pytest.raises(InputError, match="closed"):
        review.save_read(review.cases[0].case_id, [], 3, 1.0)
    # The next blinded phase of the same reader still never serves it.
    assert set(_served(_session(study, reader="R2", phase=2), study).values()) == {404}
