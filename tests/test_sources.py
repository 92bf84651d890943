"""`epd-ray data prepare` on every real-data format, from fixture files built here, and on broken files.

The faces in the fixtures are synthetic faces written out as image files (PNG, JPEG, grey, palette, RGBA,
CMYK, 16-bit), in the folder layouts and file names of the real formats.
"""

from __future__ import annotations

import csv
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from epd_ray.config import DataConfig
from epd_ray.core.synthetic import make_synthetic_faces
from epd_ray.data.decode import (DUPLICATE, EMPTY, MISSING, NO_FACE, TOO_LARGE, TOO_SMALL, TRUNCATED,
                                 UNDECODABLE, UNKNOWN_LABEL, UNLABELLED)
from epd_ray.data.prepare import REJECTS_FILE, DataError, prepare_dataset
from epd_ray.data.shards import load_split, read_manifest

SIZE = 32
FACES = make_synthetic_faces(3, 4, 48, seed=3)  # 3 people x 7 emotions x 4 variations, 48 px
EMOTION_DIRS = ("happy", "sad")                  # the folder fixtures use two emotions


def _faces_of(identity: int, emotion_name: str) -> list[np.ndarray]:
    from epd_ray.core.labels import EMOTIONS

    emo = EMOTIONS.index(emotion_name)
    return [FACES.pixels[i] for i in np.flatnonzero((FACES.identity == identity) & (FACES.emotion == emo))]


def _png(pixels: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _folder_tree(root: Path) -> dict[str, int]:
    """people p0..p2 x {happy, sad} x 4 images; returns images per identity."""
    for ident in range(3):
        for emotion in EMOTION_DIRS:
            folder = root / f"p{ident}" / emotion
            folder.mkdir(parents=True)
            for k, face in enumerate(_faces_of(ident, emotion)):
                (folder / f"{k}.png").write_bytes(_png(face))
    return {f"p{i}": 8 for i in range(3)}


def _data(source: str, path: Path, **kw) -> DataConfig:
    """The synthetic faces these folders hold fill about two thirds of their 48 px, where `face_crop=auto` would
    cut them out (and reject those CenterFace misses): the tests of layouts take them whole, and the test of
    the framing itself asks for auto."""
    return DataConfig(source=source, path=str(path), **{"image_size": SIZE, "face_crop": "square", **kw})


def _rejects(out: Path) -> dict[str, str]:
    with (out / REJECTS_FILE).open() as handle:
        return {row["file"]: row["reason"] for row in csv.DictReader(handle)}


# ------------------------------------------------------------------------------------------ formats


def test_folder_source_gives_identities_emotions_and_per_identity_splits(tmp_path):
    _folder_tree(tmp_path / "faces")
    prepared = prepare_dataset(_data("folder", tmp_path / "faces"), tmp_path / "out")
    m = prepared.manifest
    assert m["identities"] == ["p0", "p1", "p2"]
    assert m["num_images"] == 24 and m["intake"]["accepted"] == 24 and m["intake"]["rejected"] == {}
    # 4 images per (identity, emotion): 2 train, 1 val, 1 test, every identity in every split
    assert [m["splits"][s]["images"] for s in ("train", "val", "test")] == [12, 6, 6]
    for split in ("train", "val", "test"):
        faces = load_split(prepared.path, split)
        assert set(faces.identity) == {0, 1, 2}
        assert faces.pixels.shape[1:] == (SIZE, SIZE, 3)
    happy, sad = m["emotions"].index("happy"), m["emotions"].index("sad")
    assert set(m["splits"]["train"]["per_identity_emotion"]) == {f"{i}/{e}" for i in range(3) for e in (happy, sad)}
    assert (prepared.path / REJECTS_FILE).read_text().strip() == "file,reason,detail"


@pytest.mark.parametrize("fmt, column", [("csv", "emotion"), ("parquet", "emotion"), ("csv", "expression")])
def test_manifest_source_reads_csv_and_parquet_with_relative_paths(tmp_path, fmt, column):
    _folder_tree(tmp_path / "faces")
    rows = [{"path": f"faces/p{i}/{e}/{k}.png", "identity": f"person-{i}", column: e.upper()}
            for i in range(3) for e in EMOTION_DIRS for k in range(4)]
    rows.append({"path": "faces/p0/happy/404.png", "identity": "person-0", column: "happy"})
    manifest = tmp_path / f"labels.{fmt}"
    if fmt == "csv":
        with manifest.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["path", "identity", column])
            writer.writeheader()
            writer.writerows(rows)
    else:
        pq.write_table(pa.Table.from_pylist(rows), manifest)
    prepared = prepare_dataset(_data("manifest", manifest), tmp_path / "out")
    assert prepared.manifest["identities"] == ["person-0", "person-1", "person-2"]
    assert prepared.manifest["num_images"] == 24
    assert _rejects(prepared.path) == {"faces/p0/happy/404.png": MISSING}


def test_a_manifest_without_the_needed_columns_is_refused_by_name(tmp_path):
    manifest = tmp_path / "labels.csv"
    manifest.write_text("picture,who\na.png,1\n")
    with pytest.raises(DataError, match=r"labels.csv.*lacks column\(s\) path, identity, emotion .*its columns: "
                                        r"picture, who\); name yours with --columns"):
        prepare_dataset(_data("manifest", manifest), tmp_path / "out")
    with pytest.raises(DataError, match=r"labels.csv: no column 'mood' \(data.manifest_columns.emotion\)"):
        prepare_dataset(_data("manifest", manifest, manifest_columns={"path": "picture", "identity": "who",
                                                                      "emotion": "mood"}), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_contemptuous_faces_of_a_folder_are_left_out_by_choice_as_rafd_s_are(tmp_path):
    """RaFD-like sets in a folder or manifest carry the eighth expression too: left out and counted (not
    rejected as an unknown label to be mapped onto another class) unless data.include_contempt keeps it."""
    _folder_tree(tmp_path / "faces")
    for ident in range(3):
        folder = tmp_path / "faces" / f"p{ident}" / "Contempt"
        folder.mkdir()
        for k, face in enumerate(_faces_of(ident, "happy")[:3]):  # mirrored: not the happy faces' bytes
            (folder / f"{k}.png").write_bytes(_png(np.ascontiguousarray(face[:, ::-1])))
    seven = prepare_dataset(_data("folder", tmp_path / "faces"), tmp_path / "seven")
    assert seven.manifest["num_images"] == 24 and _rejects(seven.path) == {}
    assert seven.manifest["intake"]["skipped"] == {"contemptuous left out": 9}
    eight = prepare_dataset(_data("folder", tmp_path / "faces", include_contempt=True), tmp_path / "eight")
    assert eight.manifest["num_images"] == 33 and eight.manifest["emotions"][-1] == "contemptuous"


def test_a_manifest_s_columns_are_found_by_their_usual_names_or_named_by_the_user(tmp_path):
    """Sets name their columns their own way: file/Subject/label are found as path/identity/emotion (any
    case) and preparation says which it took; names of the user's own are given with --columns."""
    from typer.testing import CliRunner

    from epd_ray.cli import app

    _folder_tree(tmp_path / "faces")
    rows = [(f"faces/p{i}/{e}/{k}.png", f"person-{i}", e) for i in range(3) for e in EMOTION_DIRS for k in range(4)]
    for name, header in (("usual", "file,Subject,label"), ("own", "picture,who,mood")):
        (tmp_path / f"{name}.csv").write_text(header + "\n" + "".join(",".join(r) + "\n" for r in rows))
    said: list[str] = []
    usual = prepare_dataset(_data("manifest", tmp_path / "usual.csv"), tmp_path / "out_usual", echo=said.append)
    assert usual.manifest["num_images"] == 24 and usual.manifest["identities"] == ["person-0", "person-1", "person-2"]
    assert "manifest columns: path from 'file', identity from 'Subject', emotion from 'label'" in said
    result = CliRunner().invoke(app, ["data", "prepare", "--source", "manifest", "--path", str(tmp_path / "own.csv"),
                                      "--out", str(tmp_path / "out_own"), "--columns", "path=picture,identity=who,"
                                      "emotion=mood", "--set", "data.face_crop=square"])
    assert result.exit_code == 0, result.output
    assert read_manifest(tmp_path / "out_own")["content_hash"] == usual.manifest["content_hash"]
    bad = CliRunner().invoke(app, ["data", "prepare", "--source", "manifest", "--path", str(tmp_path / "own.csv"),
                                   "--out", str(tmp_path / "out_bad"), "--columns", "path"])
    assert bad.exit_code == 2 and "--columns path: expected ROLE=COLUMN" in bad.stderr


def _rafd_frame(face: np.ndarray) -> bytes:
    """A RaFD-like full frame (portrait, the head in the upper middle) around a face."""
    frame = np.full((150, 100, 3), 90, dtype=np.uint8)
    frame[39:87, 26:74] = face  # 48 px face centred at x 50, y 63 (0.42 of the height)
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_rafd_source_keeps_chosen_angles_and_gazes_and_leaves_contempt_out(tmp_path):
    root = tmp_path / "rafd"
    root.mkdir()
    names = {"happy": "happy", "sad": "sad"}
    for subject in (1, 2, 3):
        for emotion in names:
            for k, gaze in enumerate(("frontal", "left", "right")):
                face = _faces_of(subject - 1, emotion)[k]
                (root / f"Rafd090_{subject:02d}_Caucasian_female_{emotion}_{gaze}.jpg").write_bytes(_rafd_frame(face))
                (root / f"Rafd045_{subject:02d}_Caucasian_female_{emotion}_{gaze}.jpg").write_bytes(
                    _rafd_frame(np.flip(face, 1).copy()))
        (root / f"Rafd090_{subject:02d}_Caucasian_female_contemptuous_frontal.jpg").write_bytes(
            _rafd_frame(_faces_of(subject - 1, "neutral")[0]))
    (root / "notes.jpg").write_bytes(_rafd_frame(_faces_of(0, "neutral")[1]))

    prepared = prepare_dataset(_data("rafd", root), tmp_path / "out")
    m = prepared.manifest
    assert m["identities"] == ["rafd01", "rafd02", "rafd03"]
    assert m["num_images"] == 18 and "contemptuous" not in m["emotions"]
    assert m["intake"]["skipped"] == {"camera angle": 18, "contemptuous left out": 3}
    assert _rejects(prepared.path) == {"notes.jpg": UNLABELLED}
    faces = load_split(prepared.path, "train")
    # the crop holds the face, not the frame's flat background (90)
    assert faces.pixels.reshape(len(faces.pixels), -1).std(axis=1).min() > 10

    frontal = prepare_dataset(_data("rafd", root, rafd_gazes=("frontal",), rafd_angles=("090", "045"),
                                    include_contempt=True), tmp_path / "frontal")
    assert frontal.manifest["num_images"] == 3 * 2 * 2 + 3
    assert frontal.manifest["emotions"][-1] == "contemptuous"


def test_a_face_is_cut_on_its_box_grown_to_the_training_size_and_rafd_falls_back_to_where_its_camera_puts_it():
    """The square on the detected box, no wider (`faces.FACE_MARGIN`); a face under the training size is cut
    with the room around it it needs rather than rejected as too small; a RaFD frame where nothing is found
    is cut where RaFD's frontal camera puts the face (centred, 0.42 of the height down)."""
    from epd_ray.data.decode import Rejected
    from epd_ray.data.prepare import head_crop
    from epd_ray.faces import Box

    class Finds:
        def __init__(self, *boxes):
            self.boxes = list(boxes)

        def detect(self, rgb):
            return self.boxes

    frame = Image.fromarray(np.arange(300 * 200 * 3, dtype=np.uint32).reshape(300, 200, 3).astype(np.uint8))
    assert head_crop(frame, Finds(Box(80, 100, 40, 48))).size == (48, 48)
    grown = head_crop(frame, Finds(Box(80, 100, 40, 48)), min_side=64)
    assert grown.size == (64, 64)
    assert np.array_equal(np.asarray(grown), np.asarray(frame)[92:156, 68:132])  # centred on the box
    with pytest.raises(Rejected):
        head_crop(frame, Finds())
    fallback = head_crop(frame, Finds(), rafd_frame=True)
    assert fallback.size == (84, 84)
    assert np.array_equal(np.asarray(fallback), np.asarray(frame)[84:168, 58:142])  # centre (100, 126)


def test_a_folder_of_photographs_is_cut_to_the_head_and_a_folder_of_face_crops_taken_whole(tmp_path):
    """A folder of photographs (skimage's astronaut, a real face about a fifth of the frame wide), prepared
    as it comes (`data.face_crop=auto`): the sampled heads span little of each image, so every face is cut
    out as `deidentify` cuts it and fills the training image, preparation says why, and a photograph without
    a face is rejected by name. With `data.face_crop=square` the images are taken whole and the faces are too
    small for the detector to find again at the training size. The head crops written out as a folder of
    their own are face crops: auto takes them whole. Each set records the context left around its faces,
    the margin `deidentify` cuts faces with for a model trained on it."""
    from skimage import data

    from epd_ray.faces import make_detector

    photo = data.astronaut()
    for ident in range(3):
        for e, emotion in enumerate(EMOTION_DIRS):
            folder = tmp_path / "photos" / f"p{ident}" / emotion
            folder.mkdir(parents=True)
            for k in range(3):  # 18 different windows of the photograph, half of them mirrored
                dy, dx = 10 * ident + 20 * k, 30 * e + 5 * k
                window = photo[dy:dy + 420, dx:dx + 420]
                (folder / f"{k}.png").write_bytes(_png(np.ascontiguousarray(window[:, ::-1] if k % 2 else window)))
    (tmp_path / "photos" / "p0" / "happy" / "wall.png").write_bytes(_png(np.full((420, 420, 3), 128, np.uint8)))

    said: list[str] = []
    head = prepare_dataset(_data("folder", tmp_path / "photos", image_size=64, face_crop="auto"), tmp_path / "head",
                           echo=said.append)
    assert head.manifest["num_images"] == 18
    assert _rejects(head.path) == {"p0/happy/wall.png": NO_FACE}
    assert head.manifest["intake"]["face_crop"] == "head" and head.manifest["intake"]["face_margin"] == 0.0
    assert any("in 18 of the 19 images sampled the face spans less than 80%" in line for line in said)
    detector = make_detector("centerface")
    head_train = load_split(head.path, "train")
    widths = [max((b.w for b in detector.detect(face)), default=0) for face in head_train.pixels]
    assert min(widths) >= 0.6 * 64  # the face (three quarters of the side in width), not the room around it

    whole = prepare_dataset(_data("folder", tmp_path / "photos", image_size=64, face_crop="square"), tmp_path / "whole")
    assert whole.manifest["num_images"] == 19 and whole.manifest["intake"]["face_crop"] == "square"
    assert 1.0 < whole.manifest["intake"]["face_margin"] <= 2.0  # the face a fifth of the frame: deidentify cuts so
    assert all(max((b.w for b in detector.detect(face)), default=0) < 0.3 * 64
               for face in load_split(whole.path, "train").pixels)
    crops = tmp_path / "crops"
    for i, (face, ident) in enumerate(zip(head_train.pixels, head_train.identity)):
        folder = crops / f"p{ident}" / EMOTION_DIRS[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.png").write_bytes(_png(face))
    said.clear()
    taken = prepare_dataset(_data("folder", crops, image_size=64, face_crop="auto"), tmp_path / "crops_prepared",
                            echo=said.append)
    assert taken.manifest["intake"]["face_crop"] == "square" and not any("sampled" in line for line in said)
    assert 0.0 <= taken.manifest["intake"]["face_margin"] < 0.15  # the box is (nearly) the whole crop


def test_fer2013_rows_become_an_emotion_only_set_split_by_usage(tmp_path):
    rows = [("0", " ".join(str((i * 7 + j) % 256) for j in range(48 * 48)), usage)
            for i, usage in enumerate(["Training"] * 5 + ["PublicTest"] * 2 + ["PrivateTest"] * 2)]
    rows.append(("3", "1 2 3", "Training"))                            # too few pixels
    rows.append(("9", " ".join(["7"] * (48 * 48)), "Training"))        # no class 9
    rows.append(rows[0])                                               # the same row twice
    path = tmp_path / "fer2013.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["emotion", "pixels", "Usage"])
        writer.writerows(rows)
    prepared = prepare_dataset(_data("fer2013", path), tmp_path / "out")
    m = prepared.manifest
    assert m["identities"] == [] and m["num_images"] == 9
    assert [m["splits"][s]["images"] for s in ("train", "val", "test")] == [5, 2, 2]
    assert m["intake"]["converted"] == {"grey": 9}
    assert _rejects(prepared.path) == {"fer2013.csv:11": UNDECODABLE, "fer2013.csv:12": UNKNOWN_LABEL,
                                       "fer2013.csv:13": DUPLICATE}
    faces = load_split(prepared.path, "train")
    assert faces.pixels.shape == (5, SIZE, SIZE, 3) and set(faces.identity) == {-1} and set(faces.emotion) == {0}


# ------------------------------------------------------------------------------------------ bad files


def _bomb_png() -> bytes:
    """A valid PNG header claiming 100000 x 100000 pixels (10 gigapixels) with almost no data."""
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _converted_files(folder: Path, face: np.ndarray) -> dict[str, str]:
    """One good face in each non-RGB form; returns file -> the conversion it should be counted under."""
    folder.mkdir(parents=True, exist_ok=True)
    forms = {
        "grey.png": (Image.fromarray(face).convert("L"), "PNG", "L"),
        "palette.png": (Image.fromarray(face).convert("P"), "PNG", "P"),
        "rgba.png": (Image.fromarray(face).convert("RGBA"), "PNG", "RGBA"),
        "cmyk.jpg": (Image.fromarray(face).convert("CMYK"), "JPEG", "CMYK"),
        "deep.png": (Image.fromarray(face[..., 0].astype(np.uint16) * 257), "PNG", "16-bit"),
    }
    for name, (image, fmt, _) in forms.items():
        image.save(folder / name, format=fmt)
    return {name: kind for name, (_, _, kind) in forms.items()}


def _broken_corpus(root: Path) -> dict[str, str]:
    """A folder source with good faces and one broken file of every kind; returns file -> expected reason."""
    _folder_tree(root)
    good = (root / "p0" / "happy" / "0.png").read_bytes()
    bad = root / "p1" / "sad"
    (bad / "empty.png").write_bytes(b"")
    (bad / "noise.jpg").write_bytes(bytes(range(256)) * 4)
    (bad / "cut.png").write_bytes(good[: len(good) // 2])
    (bad / "tiny.png").write_bytes(_png(np.zeros((16, 16, 3), np.uint8)))
    (bad / "again.png").write_bytes(good)
    (bad / "bomb.png").write_bytes(_bomb_png())
    (root / "stray.png").write_bytes(_png(_faces_of(2, "happy")[0]))
    (root / "p2" / "bored").mkdir()
    (root / "p2" / "bored" / "0.png").write_bytes(_png(_faces_of(2, "neutral")[0]))
    return {"p1/sad/empty.png": EMPTY, "p1/sad/noise.jpg": UNDECODABLE, "p1/sad/cut.png": TRUNCATED,
            "p1/sad/tiny.png": TOO_SMALL, "p1/sad/again.png": DUPLICATE, "p1/sad/bomb.png": TOO_LARGE,
            "stray.png": UNLABELLED, "p2/bored/0.png": UNKNOWN_LABEL}


def test_every_broken_file_gets_one_reject_line_and_the_rest_is_kept(tmp_path):
    expected = _broken_corpus(tmp_path / "faces")
    conversions = _converted_files(tmp_path / "faces" / "p2" / "happy", _faces_of(2, "surprised")[0])
    prepared = prepare_dataset(_data("folder", tmp_path / "faces"), tmp_path / "out")
    assert _rejects(prepared.path) == expected
    m = prepared.manifest
    assert m["num_images"] == 24 + len(conversions)
    assert m["intake"]["rejected"] == {reason: list(expected.values()).count(reason) for reason in expected.values()}
    assert m["intake"]["converted"] == {kind: 1 for kind in conversions.values()}
    rows = {row["file"]: row for row in csv.DictReader((prepared.path / REJECTS_FILE).open())}
    assert "p0/happy/0.png" in rows["p1/sad/again.png"]["detail"]
    assert "pixels" in rows["p1/sad/bomb.png"]["detail"]  # refused from its header, never decoded


def test_strict_stops_at_the_first_broken_file_by_name_and_writes_nothing(tmp_path):
    _broken_corpus(tmp_path / "faces")
    with pytest.raises(DataError, match=r"^p1/sad/again.png: duplicate.*--strict"):
        prepare_dataset(_data("folder", tmp_path / "faces"), tmp_path / "out", strict=True)
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["faces"]


def test_converted_images_look_like_their_source(tmp_path):
    face = _faces_of(1, "happy")[0]
    _folder_tree(tmp_path / "faces")
    _converted_files(tmp_path / "faces" / "p1" / "happy", face)
    prepared = prepare_dataset(_data("folder", tmp_path / "faces"), tmp_path / "out")
    faces = load_split(prepared.path, "train")
    source = pq.read_table(next((prepared.path / "shards").glob("train-*")), columns=["source"]).column("source")
    reference = np.asarray(Image.fromarray(face).resize((SIZE, SIZE), Image.Resampling.LANCZOS), dtype=np.float64)
    for name in ("grey.png", "rgba.png", "deep.png", "cmyk.jpg"):
        rows = [i for i, s in enumerate(source.to_pylist()) if s.endswith(name)]
        if not rows:  # this conversion landed in val or test
            continue
        got = faces.pixels[rows[0]].astype(np.float64)
        grey_ref = reference.mean(axis=2) if name != "deep.png" else reference[..., 0]
        assert np.abs(got.mean(axis=2) - grey_ref).mean() < 12, name


def test_exif_orientation_is_applied_before_cropping(tmp_path):
    folder = tmp_path / "faces" / "p0" / "happy"
    _folder_tree(tmp_path / "faces")
    stored = np.zeros((40, 64, 3), np.uint8)
    stored[:, :32] = (255, 0, 0)  # red left half as stored
    stored[:, 32:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the red half ends up on top
    Image.fromarray(stored).save(folder / "phone.jpg", format="JPEG", exif=exif.tobytes(), quality=95)
    prepared = prepare_dataset(_data("folder", tmp_path / "faces"), tmp_path / "out")
    for split in ("train", "val", "test"):
        table = pq.read_table([str(p) for p in (prepared.path / "shards").glob(f"{split}-*")][0])
        sources = table.column("source").to_pylist()
        if "p0/happy/phone.jpg" in sources:
            pixels = np.frombuffer(table.column("pixels")[sources.index("p0/happy/phone.jpg")].as_py(), np.uint8)
            image = pixels.reshape(SIZE, SIZE, 3).astype(int)
            assert image[:8, :, 0].mean() > 200 and image[-8:, :, 2].mean() > 200  # red top, blue bottom
            return
    pytest.fail("phone.jpg was not prepared")


def test_thin_classes_are_warned_about(tmp_path):
    _folder_tree(tmp_path / "faces")
    extra = tmp_path / "faces" / "p0" / "angry"
    extra.mkdir()
    (extra / "0.png").write_bytes(_png(_faces_of(0, "angry")[0]))
    said: list[str] = []
    prepared = prepare_dataset(_data("folder", tmp_path / "faces"), tmp_path / "out", echo=said.append)
    assert any("'p0'" in line and "'angry'" in line and "1 image(s)" in line for line in said)
    assert prepared.manifest["warnings"] == [line.removeprefix("warning: ") for line in said]


def test_a_rerun_reuses_the_result_until_an_input_changes(tmp_path):
    _folder_tree(tmp_path / "faces")
    data = _data("folder", tmp_path / "faces")
    first = prepare_dataset(data, tmp_path / "out")
    assert prepare_dataset(data, tmp_path / "out").reused is True
    (tmp_path / "faces" / "p0" / "happy" / "0.png").write_bytes(_png(_faces_of(0, "happy")[3][::-1].copy()))
    again = prepare_dataset(data, tmp_path / "out")
    assert again.reused is False and again.manifest["content_hash"] != first.manifest["content_hash"]


def test_a_missing_source_folder_is_named(tmp_path):
    with pytest.raises(DataError, match="nowhere: no such folder"):
        prepare_dataset(_data("folder", tmp_path / "nowhere"), tmp_path / "out")


def test_prepare_cli_prints_the_summary_and_strict_exits_2_naming_the_file(tmp_path):
    from typer.testing import CliRunner

    from epd_ray.cli import app

    _broken_corpus(tmp_path / "faces")
    runner = CliRunner()
    square = ["--set", "data.face_crop=square"]  # synthetic faces taken whole (`_data`)
    ok = runner.invoke(app, ["data", "prepare", "--source", "folder", "--path", str(tmp_path / "faces"),
                             "--out", str(tmp_path / "out"), *square])
    assert ok.exit_code == 0, ok.output
    assert "accepted 24" in ok.output and "rejected 8" in ok.output and "too small: 1" in ok.output
    assert json.loads((tmp_path / "out" / "dataset.json").read_text())["intake"]["accepted"] == 24
    strict = runner.invoke(app, ["data", "prepare", "--source", "folder", "--path", str(tmp_path / "faces"),
                                 "--out", str(tmp_path / "strict"), "--strict", *square])
    assert strict.exit_code == 2 and "p1/sad/again.png" in strict.output and not (tmp_path / "strict").exists()
    read_manifest(tmp_path / "out")


# ------------------------------------------------------------------------------------------ into training


def _fer_csv(path: Path, rows_per_emotion: int = 6) -> Path:
    """A FER2013 CSV of grey synthetic faces (48 px), every emotion, Usage splits."""
    faces = make_synthetic_faces(4, rows_per_emotion, 48, seed=11)
    usage = {0: "Training", 1: "Training", 2: "PublicTest", 3: "PrivateTest"}
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["emotion", "pixels", "Usage"])
        for pixels, emotion, ident in zip(faces.pixels, faces.emotion, faces.identity):
            grey = np.asarray(Image.fromarray(pixels).convert("L"))
            writer.writerow([int(emotion), " ".join(map(str, grey.ravel())), usage[int(ident)]])
    return path


@pytest.mark.slow  # 37 s: kept out of CI so the suite stays under 10 minutes (intake and FER2013 have unit tests)
def test_a_broken_folder_trains_on_the_rest_with_emotion_networks_from_fer2013(ray_runtime, tiny_experiment,
                                                                                tmp_path):
    """Real formats all the way into Ray Train: pretraining (S and S_e on FER2013) and a GAN epoch with
    the mirror/shift augmentation running as Ray Data map_batches tasks beside the Train worker."""
    from epd_ray.data.stream import materialized_split
    from epd_ray.train.run import pretrain_networks
    from epd_ray.train.gan import GanInputs
    from epd_ray.tune.search import gan_trainer

    _broken_corpus(tmp_path / "faces")
    faces = prepare_dataset(_data("folder", tmp_path / "faces"), tmp_path / "prepared")
    fer = prepare_dataset(_data("fer2013", _fer_csv(tmp_path / "fer2013.csv")), tmp_path / "fer")
    assert faces.manifest["num_images"] == 24 and fer.manifest["splits"]["train"]["images"] == 7 * 6 * 2
    exp = tiny_experiment.model_copy(update={
        # 12 training faces: batches of 8, so that every budgeted step has a full batch
        "verifiers": tiny_experiment.verifiers.model_copy(update={"emotion_data": str(fer.path), "batch_size": 8}),
        "train": tiny_experiment.train.model_copy(update={"steps": 2, "report_every": 2, "flip": True,
                                                          "max_shift": 2})})
    train = materialized_split(faces.path)
    said: list[str] = []
    pretrained = pretrain_networks(exp, faces, cache_dir=tmp_path / "cache", runtime=ray_runtime, echo=said.append)
    assert any("emotion networks learn from" in line and str(fer.path) in line for line in said)
    result = gan_trainer(exp, {}, train_data=train, inputs=GanInputs.put(faces.path, pretrained), name="gan-folder",
                         storage_path=str(tmp_path / "ray")).fit()
    assert result.error is None and 0.0 <= result.metrics["objective"] <= 1.0


def test_a_sets_own_labels_map_to_the_classes_and_thin_people_still_reach_val_and_test(tmp_path):
    """JAFFE-like: the set's own emotion names (built-in synonyms, and `data.label_map` for the rest),
    and 1-2 images per person and expression, so no expression of a person has the 3 a stratified split
    needs: every person is in train, val and test all the same."""
    for ident in range(3):
        for label, emotion, count in (("anger", "angry", 2), ("HAPPINESS", "happy", 2), ("mad-ish", "sad", 1)):
            folder = tmp_path / "faces" / f"p{ident}" / label
            folder.mkdir(parents=True)
            for k, face in enumerate(_faces_of(ident, emotion)[:count]):
                (folder / f"{k}.png").write_bytes(_png(face))
    unmapped = prepare_dataset(_data("folder", tmp_path / "faces"), tmp_path / "unmapped")
    assert unmapped.manifest["intake"]["rejected"] == {"label outside the class list": 3}
    assert "--label-map mad-ish=CLASS" in (tmp_path / "unmapped" / REJECTS_FILE).read_text()
    said: list[str] = []
    prepared = prepare_dataset(_data("folder", tmp_path / "faces", label_map={"Mad-ish": "sad"}), tmp_path / "out",
                               echo=said.append)
    m = prepared.manifest
    assert m["intake"]["accepted"] == 15 and m["intake"]["rejected"] == {}
    for split in ("train", "val", "test"):
        faces = load_split(prepared.path, split)
        assert set(faces.identity) == {0, 1, 2}, split
    train = load_split(prepared.path, "train")
    for ident in range(3):  # every expression of every person keeps an image in train
        assert {int(e) for e in train.emotion[train.identity == ident]} == {0, 3, 4}
    assert not any("no image in" in line for line in said)


def test_the_label_map_option_of_data_prepare(tmp_path):
    from typer.testing import CliRunner

    from epd_ray.cli import app

    _folder_tree(tmp_path / "faces")
    (tmp_path / "faces" / "p0" / "happy").rename(tmp_path / "faces" / "p0" / "joyful")
    runner = CliRunner()
    ok = runner.invoke(app, ["data", "prepare", "--source", "folder", "--path", str(tmp_path / "faces"),
                             "--out", str(tmp_path / "out"), "--label-map", "joyful=happy",
                             "--set", "data.face_crop=square"])  # synthetic faces taken whole (`_data`)
    assert ok.exit_code == 0 and "accepted 24; rejected 0" in ok.output, ok.output
    bad = runner.invoke(app, ["data", "prepare", "--source", "folder", "--path", str(tmp_path / "faces"),
                              "--out", str(tmp_path / "bad"), "--label-map", "joyful"])
    assert bad.exit_code == 2 and "--label-map joyful: expected LABEL=CLASS" in bad.output
    wrong = runner.invoke(app, ["data", "prepare", "--source", "folder", "--path", str(tmp_path / "faces"),
                                "--out", str(tmp_path / "wrong"), "--label-map", "joyful=glad"])
    assert wrong.exit_code == 2 and "data.label_map" in wrong.output and "'glad'" in wrong.output
