"""De-identify a video file: frames read with OpenCV, written with the ffmpeg binary that imageio-ffmpeg
ships (H.264, or VP9 for .webm; the input's fps, size and frame count; `crf` sets the quality), then the
input's audio is muxed back in (AAC, Opus for .webm) with no metadata of the input.

Faces are tracked across frames (`IoUTracker`): a face the detector misses in a frame, or a frame the
detector skips (`detect_every`), is covered where its track puts it, and each track keeps one noise seed, so
a face's replacement does not flicker.
"""

from __future__ import annotations

import math
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable

import cv2
import imageio_ffmpeg
import numpy as np

from epd_ray.deploy.batching import Batcher, Job
from epd_ray.deploy.context import Context
from epd_ray.deploy.faces import IoUTracker, blur_face, blur_image, seed_for
from epd_ray.faces import face_region

DEFAULT_FPS = 25.0
WEBM = {"video": ["-c:v", "libvpx-vp9", "-b:v", "0", "-row-mt", "1"], "audio": ["-c:a", "libopus"]}
H264 = {"video": ["-c:v", "libx264", "-preset", "medium"], "audio": ["-c:a", "aac"]}


class VideoError(RuntimeError):
    pass


def ffmpeg_exe() -> str:
    """imageio-ffmpeg's bundled ffmpeg (or the one IMAGEIO_FFMPEG_EXE names)."""
    return imageio_ffmpeg.get_ffmpeg_exe()


def codecs(path: Path) -> dict[str, list[str]]:
    return WEBM if path.suffix.lower() == ".webm" else H264


class Encoder:
    """RGB frames piped into ffmpeg: H.264 (VP9 for .webm) at `crf`, `fps`, w x h, no audio, no metadata."""

    def __init__(self, path: Path, width: int, height: int, fps: float, crf: int):
        # 4:2:0 chroma (what every player takes) needs an even width and height; odd sizes keep 4:4:4
        pix_fmt = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"
        cmd = [ffmpeg_exe(), "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}",
               "-r", repr(float(fps)), "-i", "-", *codecs(path)["video"], "-crf", str(crf), "-pix_fmt", pix_fmt,
               "-an", "-map_metadata", "-1", str(path)]
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self.log)

    def _error(self) -> VideoError:
        self.log.seek(0)
        lines = self.log.read().decode(errors="replace").strip().splitlines()
        return VideoError(f"ffmpeg could not encode the video ({lines[-1] if lines else 'no message'})")

    def write(self, rgb: np.ndarray) -> None:
        try:
            self.proc.stdin.write(np.ascontiguousarray(rgb).tobytes())
        except (BrokenPipeError, OSError):
            self.proc.wait()
            raise self._error() from None

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        if self.proc.wait() != 0:
            raise self._error()
        self.log.close()

    def abort(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.log.close()


def process_video(src: Path, dst: Path, rel: str, ctx: Context) -> dict[str, Any]:
    """Write the de-identified video to dst; returns per-file counts (frames, faces found, replaced, covered
    by tracking alone, blurred past max_faces, tracks, no-face frames)."""
    cap = cv2.VideoCapture(str(src))
    if not cap.isOpened():
        raise VideoError("OpenCV cannot open this video")
    tmp = dst.parent / f".{dst.stem}.partial{dst.suffix}"
    encoder = None
    try:
        fps = cap.get(cv2.CAP_PROP_FPS)
        fps = fps if fps and math.isfinite(fps) and fps > 0 else DEFAULT_FPS
        expected = max(0, int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0))
        ok, frame = cap.read()
        if not ok or frame is None:
            raise VideoError("no frame could be read")
        h, w = frame.shape[:2]
        dst.parent.mkdir(parents=True, exist_ok=True)
        opts = ctx.options
        encoder = Encoder(tmp, w, h, fps, opts.crf)
        tracker = IoUTracker(seed_for(opts.seed, rel, "video"), hold=opts.track_hold, detect_every=opts.detect_every)
        batcher = Batcher(ctx.engine)
        counts = {"frames": 0, "faces": 0, "replaced": 0, "tracked": 0, "blurred": 0, "tracks": 0,
                  "no_face_frames": 0}
        bar = ctx.progress(total=expected or None, desc=rel, unit="frame", leave=False)
        try:
            while ok:
                rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
                if rgb.shape[:2] != (h, w):
                    rgb = cv2.resize(rgb, (w, h))
                if opts.aligned:
                    batcher.add(Job(rgb, done=encoder.write, aligned_seed=seed_for(opts.seed, rel, "aligned")))
                else:
                    boxes = ctx.detector.detect(rgb) if counts["frames"] % opts.detect_every == 0 else None
                    counts["faces"] += len(boxes or [])
                    tracked = tracker.update(None if boxes is None else boxes[:opts.max_faces], rgb)
                    for extra in (boxes or [])[opts.max_faces:]:
                        blur_face(rgb, face_region(extra, opts.margin))
                        counts["blurred"] += 1
                    if not tracked:
                        counts["no_face_frames"] += 1
                        if opts.on_no_face == "blur":
                            rgb = blur_image(rgb)
                    faces = [(face_region(box, opts.margin), tracker.seed(tid)) for box, tid in tracked]
                    batcher.add(Job(rgb, faces, done=encoder.write))
                counts["frames"] += 1
                bar.update(1)
                ok, frame = cap.read()
            batcher.flush()
        finally:
            bar.close()
        counts["replaced"] = batcher.replaced
        counts["tracked"] = tracker.tracked_only
        counts["tracks"] = tracker.next_id
        encoder.close()
        encoder = None
        if not opts.aligned and counts["faces"] == 0 and opts.on_no_face == "skip":
            tmp.unlink(missing_ok=True)
            counts["skipped"] = True
            return counts
        mux_audio(src, tmp, dst, ctx.warn)
        return counts
    except BaseException:
        if encoder is not None:
            encoder.abort()
        tmp.unlink(missing_ok=True)
        raise
    finally:
        cap.release()


def mux_audio(src: Path, video: Path, dst: Path, warn: Callable[[str], None]) -> None:
    """Move `video` to dst with src's audio (if any) re-encoded into it; the input's metadata and chapters
    are dropped. When ffmpeg fails at this step the video is kept without sound and a warning says so."""
    muxed = video.with_name(video.stem + ".audio" + video.suffix)
    cmd = [ffmpeg_exe(), "-nostdin", "-v", "error", "-y", "-i", str(video), "-i", str(src), "-map", "0:v:0",
           "-map", "1:a?", "-c:v", "copy", *codecs(dst)["audio"], "-map_metadata", "-1", "-map_chapters", "-1",
           "-shortest", str(muxed)]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        if result.returncode == 0 and muxed.is_file():
            os.replace(muxed, dst)
            video.unlink(missing_ok=True)
            return
        reason = (result.stderr.strip().splitlines() or ["unknown error"])[-1]
    except (OSError, subprocess.SubprocessError) as exc:
        reason = str(exc)
    muxed.unlink(missing_ok=True)
    warn(f"{dst}: ffmpeg could not copy the audio ({reason}); the video is written without sound")
    os.replace(video, dst)
