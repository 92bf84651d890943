"""De-identify a video file: frames read and written with OpenCV (same fps, size and frame count).

Faces are tracked across frames by IoU and each track keeps one noise seed, so a face's replacement
does not flicker. OpenCV does not carry audio: with `ffmpeg` on PATH the input's audio is muxed back,
without it a warning says the output is silent.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import cv2
import numpy as np

from epd_ray.deploy.batching import Batcher, Job
from epd_ray.deploy.faces import IoUTracker, blur_face, blur_image, face_region, seed_for

if TYPE_CHECKING:
    from epd_ray.deploy.deidentify import Context

FOURCC = {".avi": "MJPG", ".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".mkv": "MJPG", ".webm": "VP80"}
DEFAULT_FPS = 25.0


class VideoError(RuntimeError):
    pass


def process_video(src: Path, dst: Path, rel: str, ctx: "Context") -> dict[str, Any]:
    """Write the de-identified video to dst; returns per-file counts (frames, faces, tracks, no-face frames)."""
    cap = cv2.VideoCapture(str(src))
    if not cap.isOpened():
        raise VideoError("OpenCV cannot open this video")
    tmp = dst.parent / f".{dst.stem}.partial{dst.suffix}"
    writer = None
    try:
        fps = cap.get(cv2.CAP_PROP_FPS)
        fps = fps if fps and math.isfinite(fps) and fps > 0 else DEFAULT_FPS
        expected = max(0, int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0))
        ok, frame = cap.read()
        if not ok or frame is None:
            raise VideoError("no frame could be read")
        h, w = frame.shape[:2]
        dst.parent.mkdir(parents=True, exist_ok=True)
        writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*FOURCC.get(dst.suffix.lower(), "mp4v")), fps, (w, h))
        if not writer.isOpened():
            raise VideoError(f"OpenCV cannot write {dst.suffix} video here")
        opts = ctx.options
        tracker = IoUTracker(seed_for(opts.seed, rel, "video"))
        batcher = Batcher(ctx.engine)
        counts = {"frames": 0, "faces": 0, "replaced": 0, "tracks": 0, "no_face_frames": 0}

        def write(image: np.ndarray) -> None:
            writer.write(cv2.cvtColor(image, cv2.COLOR_RGB2BGR))

        bar = ctx.progress(total=expected or None, desc=rel, unit="frame", leave=False)
        try:
            while ok:
                rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
                if rgb.shape[:2] != (h, w):
                    rgb = cv2.resize(rgb, (w, h))
                if opts.aligned:
                    batcher.add(Job(rgb, done=write, aligned_seed=seed_for(opts.seed, rel, "aligned")))
                else:
                    boxes = ctx.detector.detect(rgb)
                    counts["faces"] += len(boxes)
                    for extra in boxes[opts.max_faces:]:
                        if opts.on_no_face != "copy":
                            blur_face(rgb, face_region(extra, opts.margin))
                    tracked = tracker.update(boxes[:opts.max_faces])
                    if not tracked:
                        counts["no_face_frames"] += 1
                        if opts.on_no_face == "blur":
                            rgb = blur_image(rgb)
                    faces = [(face_region(box, opts.margin), tracker.seed(tid)) for box, tid in tracked]
                    batcher.add(Job(rgb, faces, done=write))
                counts["frames"] += 1
                bar.update(1)
                ok, frame = cap.read()
            batcher.flush()
        finally:
            bar.close()
        counts["replaced"] = batcher.replaced
        counts["tracks"] = tracker.next_id
        writer.release()
        writer = None
        if not opts.aligned and counts["faces"] == 0 and opts.on_no_face == "skip":
            tmp.unlink(missing_ok=True)
            counts["skipped"] = True
            return counts
        mux_audio(src, tmp, dst, ctx.warn)
        return counts
    except BaseException:
        if writer is not None:
            writer.release()
        tmp.unlink(missing_ok=True)
        raise
    finally:
        cap.release()


def mux_audio(src: Path, video: Path, dst: Path, warn: Callable[[str], None]) -> None:
    """Move `video` to dst, with src's audio track (if any) muxed back when ffmpeg is on PATH."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        warn("audio is not copied to de-identified videos: OpenCV drops audio and ffmpeg is not on PATH "
             "(install ffmpeg to keep it)")
        os.replace(video, dst)
        return
    muxed = video.with_name(video.stem + ".audio" + video.suffix)
    cmd = [ffmpeg, "-nostdin", "-v", "error", "-y", "-i", str(video), "-i", str(src), "-map", "0:v:0", "-map", "1:a?",
           "-c:v", "copy", "-c:a", "copy", "-map_metadata", "-1", "-map_chapters", "-1", "-shortest", str(muxed)]
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
