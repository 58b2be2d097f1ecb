"""What the Python API (:class:`~megactor_rt.client.Client`, :class:`~megactor_rt.runtime.animator.Animator`,
:class:`~megactor_rt.config.AnimateConfig`) checks of its arguments before any work, as the CLI checks its flags:
a result that would replace an input, a result's format and path, values of the wrong type."""

from __future__ import annotations

import http.server
import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from media_fixtures import DRIVER, PORTRAIT

from megactor_rt.client import Client
from megactor_rt.errors import InputError
from megactor_rt.runtime.animator import Animator


class _Stub(http.server.BaseHTTPRequestHandler):
    """A stand-in for ``megactor-rt serve``: takes any job (its form kept in ``forms``), says it is done, and sends
    ``RESULT`` as its result."""

    forms: list[bytes] = []

    def _answer(self, status: int, doc: dict[str, object] | None = None, body: bytes | None = None) -> None:
        data = json.dumps(doc).encode() if body is None else body
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path == "/health":
            self._answer(200, {"max_upload_bytes": 1 << 30})
        elif self.path.endswith("/result"):
            self._answer(200, body=b"RESULT")
        else:
            self._answer(200, {"status": "done"})

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        _Stub.forms.append(self.rfile.read(int(self.headers["Content-Length"])))
        self._answer(202, {"id": "j1"})

    def do_DELETE(self) -> None:  # noqa: N802 - http.server's name
        self._answer(200, {})

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def stub(monkeypatch: pytest.MonkeyPatch) -> Iterator[Client]:
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)  # (the local server is reached directly)
    _Stub.forms = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield Client(f"http://127.0.0.1:{httpd.server_address[1]}", timeout_s=10)
    finally:
        httpd.shutdown()
        httpd.server_close()


def _format_sent(form: bytes) -> str:
    return form.split(b'name="format"\r\n\r\n')[1].split(b"\r\n")[0].decode()


def test_a_clients_result_never_replaces_its_inputs(stub: Client, tmp_path: Path) -> None:
    portrait, driver = tmp_path / "me.png", tmp_path / "talk.mp4"
    shutil.copy(PORTRAIT, portrait)
    shutil.copy(DRIVER, driver)
    mask = tmp_path / "mask.png"
    shutil.copy(PORTRAIT, mask)
    for output, what in ((portrait, "portrait"), (driver, "driver"), (tmp_path / "." / "talk.mp4", "driver")):
        with pytest.raises(InputError, match=f"would overwrite the {what}"):
            stub.animate(portrait, driver, output)
    with pytest.raises(InputError, match="would overwrite the mask"):
        stub.animate(portrait, driver, tmp_path / "mask.png", fields={"format": "mp4"}, files={"mask": mask})
    assert _Stub.forms == []  # (refused before anything was sent)
    assert portrait.read_bytes() == PORTRAIT.read_bytes() and driver.read_bytes() == DRIVER.read_bytes()


def test_a_clients_result_format_is_its_suffixes(stub: Client, tmp_path: Path) -> None:
    for name, fmt in (("a.gif", "gif"), ("b.WEBP", "webp"), ("c.mp4", "mp4"), ("d.mkv", "mkv")):
        stub.animate(PORTRAIT, DRIVER, tmp_path / name)
        assert _format_sent(_Stub.forms[-1]) == fmt and (tmp_path / name).read_bytes() == b"RESULT"
    stub.animate(PORTRAIT, DRIVER, tmp_path / "e.mp4", fields={"format": "gif"})  # (the caller's word stands)
    assert _format_sent(_Stub.forms[-1]) == "gif"


def test_a_clients_result_path_is_checked_before_sending(stub: Client, tmp_path: Path) -> None:
    (tmp_path / "folder.mp4").mkdir()
    for output, message in ((tmp_path / "missing" / "a.mp4", "output folder .* does not exist"),
                            (tmp_path / "folder.mp4", "output path is a directory"),
                            (tmp_path / "take" / "%05d.png", "image sequences .* are made by a local run"),
                            (tmp_path / "a.txt", "a server writes a video file"),
                            (tmp_path / ("x" * 300 + ".mp4"), "file name is longer than this file system allows"),
                            (Path("-"), "made by a local run")):
        with pytest.raises(InputError, match=message):
            stub.animate(PORTRAIT, DRIVER, output)
    assert _Stub.forms == []


@pytest.mark.parametrize(("field", "value", "says"), [
    ("seed", 1.5, "seed must be a whole number"), ("steps", 2.5, "steps must be a whole number"),
    ("steps", "4", "steps must be a whole number .* got '4'"), ("steps", 4.0, "steps must be a whole number"),
    ("steps", True, "steps must be a whole number .* got True"), ("window", 8.5, "window must be a whole number"),
    ("overlap", 2.5, "overlap must be a whole number"), ("max_frames", 2.5, "max_frames must be a whole number"),
    ("cfg_steps", 1.5, "cfg_steps must be a whole number"), ("feature_reuse", 2.5, "feature_reuse must be a whole"),
    ("reference_timestep", 2.5, "reference_timestep must be a whole number"),
    ("window_batch", 2.5, "window_batch must be a whole number"), ("bit_depth", 8.0, "bit_depth must be a whole"),
    ("guidance", "4.5", "guidance must be a number, got '4.5'"), ("guidance", False, "guidance must be a number"),
    ("fps", "30", "fps must be a number, got '30'"), ("steps", None, "steps must be a whole number .* got None"),
    ("closed_loop", "false", "closed_loop must be True or False, got 'false'"),
    ("decode_streams", 0, "decode_streams must be True or False, got 0")])
def test_config_fields_of_the_wrong_type_are_refused_naming_the_field(field: str, value: object, says: str) -> None:
    """A count that is no whole number, a bool or a string for a number: refused when the config is made (was:
    max_frames=2.5 gave 3 frames, steps=2.5 a TypeError in the scheduler, seed=1.5 a TypeError in torch)."""
    from megactor_rt.config import AnimateConfig

    with pytest.raises(ValueError, match=says):
        AnimateConfig(**{field: value})


def test_config_takes_numpy_numbers_as_pythons() -> None:
    from megactor_rt.config import AnimateConfig

    cfg = AnimateConfig(steps=np.int64(3), seed=np.uint32(7), guidance=np.float32(2.5), max_frames=np.int16(4),
                        fps=np.float64(24), window=np.int8(8), overlap=np.int32(4), closed_loop=np.bool_(False))
    assert cfg.closed_loop is False
    assert (cfg.steps, cfg.seed, cfg.guidance, cfg.max_frames, cfg.fps, cfg.window, cfg.overlap) == (3, 7, 2.5, 4, 24,
                                                                                                   8, 4)
    assert all(type(v) in (int, float) for v in (cfg.steps, cfg.seed, cfg.guidance, cfg.max_frames, cfg.fps))
    json.dumps(cfg.plain())  # (a record of the run: numpy numbers are no JSON)


@pytest.fixture(scope="module")
def anim() -> Animator:
    from megactor_rt.config import AnimateConfig

    return Animator.demo(seed=0, device="cpu", config=AnimateConfig(steps=1, window=4, overlap=2, max_frames=2))


def test_api_counts_of_the_wrong_type_are_input_errors(anim: Animator, tmp_path: Path) -> None:
    """prepare(seed=, face=), animate(driver_face=) and animate_to_file(face=, driver_face=, crf=) take whole numbers
    (numpy integers too), and refuse others naming the argument, before any work."""
    for options, says in (({"seed": 1.5}, "seed must be a whole number"), ({"face": 1.0}, "face must be a whole"),
                          ({"face": True}, "face must be a whole number"), ({"seed": 2 ** 64}, "seed must fit")):
        with pytest.raises(InputError, match=says):
            anim.prepare(PORTRAIT, **options)
    assert anim.prepare(PORTRAIT, seed=np.int64(3), face=np.int32(1)).key == anim.prepare(PORTRAIT, seed=3, face=1).key
    state = anim.prepare(PORTRAIT)
    with pytest.raises(InputError, match="driver_face must be a whole number .an int., got '1'"):
        next(anim.animate(state, DRIVER, driver_face="1"))  # type: ignore[arg-type]
    out = tmp_path / "o.mp4"
    for options, says in (({"crf": 20.5}, "crf must be a whole number"), ({"face": "1"}, "face must be a whole"),
                          ({"driver_face": 1.5}, "driver_face must be a whole number")):
        with pytest.raises(InputError, match=says):
            anim.animate_to_file(PORTRAIT, DRIVER, out, audio=False, **options)
        assert not out.exists()
    assert anim.animate_to_file(PORTRAIT, DRIVER, out, audio=False, crf=np.int64(30), face=np.int8(1)).frames == 2


def test_the_package_is_marked_as_typed() -> None:
    """PEP 561: type checkers read megactor_rt's annotations only where the package holds py.typed, and the wheel
    holds it only where pyproject.toml lists it as package data."""
    import megactor_rt

    tomllib = pytest.importorskip("tomllib")  # (Python 3.11 on)
    assert (Path(megactor_rt.__file__).parent / "py.typed").is_file()
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["megactor_rt"]


def test_a_mask_in_memory_is_refused_saying_so(anim: Animator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The portrait may be an array or a PIL image, the mask must be a file (its alpha, rotation and bit depth are
    read from it): an array or PIL image is an InputError saying so before the portrait's face search (was: a
    TypeError from pathlib after it)."""
    from PIL import Image

    from megactor_rt.runtime import animator

    def no_face_search(*args: object, **kwargs: object) -> None:
        raise AssertionError("the portrait was searched")

    monkeypatch.setattr(animator, "crop_portrait", no_face_search)
    for mask in (np.full((844, 768), 255, np.uint8), Image.new("L", (768, 844), 255)):
        with pytest.raises(InputError, match=f"mask must be an image file's path .* got {type(mask).__name__}; save"):
            anim.prepare(PORTRAIT, mask=mask)  # type: ignore[arg-type]
        with pytest.raises(InputError, match="mask must be an image file's path"):
            anim.animate_to_file(PORTRAIT, DRIVER, tmp_path / "o.mp4", mask=mask)  # type: ignore[arg-type]
    assert not (tmp_path / "o.mp4").exists()


def test_the_readmes_uses_of_the_animator_type_check() -> None:
    """The README's Python lines check under ``mypy --strict`` without casts: ``closing(anim.animate(...))`` needs
    a close() in animate's return type, ``aclosing(anim.animate_async(...))`` an aclose(), and a PIL image is a
    portrait of prepare, paste_back, portrait_inputs and animate_to_file (was: Iterator and AsyncIterator, refused
    by closing() and aclosing(), and no PIL image in the portrait's type)."""
    import collections.abc
    import typing

    from PIL import Image

    hints = {name: typing.get_type_hints(getattr(Animator, name)) for name in
             ("animate", "animate_async", "prepare", "paste_back", "portrait_inputs", "animate_to_file")}
    assert typing.get_origin(hints["animate"]["return"]) is collections.abc.Generator
    assert typing.get_origin(hints["animate_async"]["return"]) is collections.abc.AsyncGenerator
    for name in ("prepare", "paste_back", "portrait_inputs", "animate_to_file"):
        assert Image.Image in typing.get_args(hints[name]["portrait"]), name


def test_a_web_address_given_to_the_python_api_is_named_as_one(anim: Animator, tmp_path: Path) -> None:
    """The command line downloads http(s) addresses; the Python API reads local files, and says so naming the
    address and how to download it (was: 'https:/example.com/meme.mp4: video file does not exist', the address
    folded into a missing local path)."""
    state = anim.prepare(PORTRAIT)
    says = r"https://example.com/{}: a web address .*megactor_rt.remote.download"
    with pytest.raises(InputError, match=says.format("meme.mp4")):
        next(anim.animate(state, "https://example.com/meme.mp4"))
    with pytest.raises(InputError, match=says.format("me.png")):
        anim.prepare(Path("https://example.com/me.png"))  # (a Path folds the address: https:/example.com/...)
    out = tmp_path / "o.mp4"
    for name, value in (("portrait", "HTTPS://example.com/me.png"), ("driver", "https://example.com/meme.mp4"),
                        ("mask", "https://example.com/mask.png"), ("audio", "https://example.com/song.m4a")):
        with pytest.raises(InputError, match=says.format(value.rsplit("/", 1)[1])):
            anim.animate_to_file(**{"portrait": PORTRAIT, "driver": DRIVER, "output": out, name: value})
    assert not out.exists()


def test_a_portrait_in_memory_of_too_few_or_too_many_pixels_is_refused_naming_its_size(
        anim: Animator, tmp_path: Path) -> None:
    """An array or PIL image portrait must have sides of 64 to 8192 px, as a portrait file and a driver in memory
    (DriverFrames) must: an InputError naming its size before the face search (was: an empty one crashed in the face
    search, ZeroDivisionError, or the centre crop, ValueError; a 1x1 or 20x30 one was cropped and animated; one of
    5x10000 px ended in an OpenCV assertion)."""
    from PIL import Image

    for bad in (np.zeros((0, 0, 3), np.uint8), np.zeros((1, 1, 3), np.uint8), np.zeros((63, 200, 3), np.uint8),
                np.zeros((8193, 64, 3), np.uint8), Image.new("RGB", (0, 0)), Image.new("RGB", (20, 30))):
        shape = bad.shape if isinstance(bad, np.ndarray) else (bad.height, bad.width)
        says = rf"portrait array: the portrait is {shape[1]}x{shape[0]} px; each side must be 64 to 8192 px"
        for face_crop in (True, False):
            with pytest.raises(InputError, match=says):
                anim.prepare(bad, face_crop=face_crop)
        with pytest.raises(InputError, match=says):
            anim.paste_back(bad)
        with pytest.raises(InputError, match=says):
            anim.animate_to_file(bad, DRIVER, tmp_path / "o.mp4")
    assert not (tmp_path / "o.mp4").exists()
    anim.prepare(np.zeros((64, 8192, 3), np.uint8), face_crop=False)  # the limits themselves are taken


def test_a_run_config_or_progress_function_of_the_wrong_type_is_refused_naming_it(anim: Animator, tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """animate(), animate_async() and animate_to_file() take an AnimateConfig as ``config`` and a function as
    ``on_progress``: anything else is an InputError naming the argument before any work (was: an AttributeError,
    "'dict' object has no attribute 'face_detector'", or a TypeError, "'str' object is not callable", from the first
    progress report, after the portrait was prepared and the driver's faces searched)."""
    import asyncio

    from megactor_rt.runtime import animator

    state = anim.prepare(PORTRAIT)

    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("the work began")

    monkeypatch.setattr(animator, "crop_portrait", no_work)
    monkeypatch.setattr(anim.plans, "plan", no_work)
    out = tmp_path / "o.mp4"
    for options, says in (({"config": {"steps": 1}}, "config must be an AnimateConfig .* got dict"),
                          ({"on_progress": "print"}, "on_progress must be a function .* got str")):
        with pytest.raises(InputError, match=says):
            next(anim.animate(state, DRIVER, **options))  # type: ignore[arg-type]
        with pytest.raises(InputError, match=says):
            anim.animate_to_file(PORTRAIT, DRIVER, out, **options)  # type: ignore[arg-type]

        async def first(options: dict[str, object] = options) -> None:
            async for _ in anim.animate_async(state, DRIVER, **options):
                break

        with pytest.raises(InputError, match=says):
            asyncio.run(first())
    assert not out.exists()


def test_an_animator_given_a_config_that_is_no_animate_config_is_refused_at_once(anim: Animator,
                                                                              tmp_path: Path) -> None:
    """Animator(...), Animator.demo(...) and Animator.from_weights(...) refuse a ``config`` that is no AnimateConfig
    (a dict of its fields) naming it, before any weights are built or loaded (was: taken, then an AttributeError,
    "'dict' object has no attribute 'seed'", from the first prepare())."""
    from megactor_rt.runtime import animator

    says = "config must be an AnimateConfig .* got dict"
    with pytest.raises(InputError, match=says):
        Animator(anim.sub, {"steps": 1})  # type: ignore[arg-type]
    with pytest.raises(InputError, match=says):
        Animator.demo(config={"steps": 1})  # type: ignore[arg-type]
    with pytest.raises(InputError, match=says):
        Animator.from_weights(tmp_path, config={"steps": 1})  # type: ignore[arg-type]
    assert animator.AnimateConfig is type(Animator(anim.sub).config)  # (None: upstream's defaults)
    for call in (anim.warmup, anim.run_settings):  # (were an AttributeError, "'dict' object has no attribute ...")
        with pytest.raises(InputError, match=says):
            call({"steps": 1})  # type: ignore[arg-type]


def test_paste_back_and_portrait_inputs_check_their_face_and_mask_as_prepare_does(anim: Animator,
                                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """paste_back(face=) and portrait_inputs(face=, mask=) take what prepare() takes and refuse the rest as it does:
    a face number that is no whole number, a mask in memory or a web address, an InputError naming the argument
    before the face search (was: TypeErrors from the face search, "list indices must be integers or slices, not
    float", "'<' not supported between instances of 'str' and 'int'", or from pathlib, and a web address folded
    into "https:/x.com/m.png: mask file does not exist")."""
    from PIL import Image

    from megactor_rt import preprocess

    searched: list[int] = []
    portrait_crop = preprocess.portrait_crop

    def counted(*args: object, **kwargs: object) -> object:
        searched.append(1)
        return portrait_crop(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr("megactor_rt.runtime.animator.portrait_crop", counted)
    for face, says in ((1.0, "face must be a whole number"), ("1", "face must be a whole number")):
        with pytest.raises(InputError, match=says):
            anim.paste_back(PORTRAIT, face=face)  # type: ignore[arg-type]
        with pytest.raises(InputError, match=says):
            anim.portrait_inputs(PORTRAIT, face=face)  # type: ignore[arg-type]
    for mask, says in ((np.zeros((64, 64), np.uint8), "mask must be an image file's path .* got ndarray"),
                       (Image.new("L", (64, 64)), "mask must be an image file's path .* got Image"),
                       ("https://example.com/m.png", "https://example.com/m.png: a web address")):
        with pytest.raises(InputError, match=says):
            anim.portrait_inputs(PORTRAIT, mask=mask)  # type: ignore[arg-type]
    assert searched == []
    assert anim.paste_back(PORTRAIT, face=np.int64(1)).width == anim.paste_back(PORTRAIT).width
    assert anim.portrait_inputs(PORTRAIT, face=np.int32(1)).digest() == anim.portrait_inputs(PORTRAIT).digest()


def test_a_pil_image_whose_pixels_cannot_be_read_is_named(anim: Animator, tmp_path: Path) -> None:
    """A PIL image portrait whose file was closed before Pillow read its pixels (``with Image.open(p) as im: pass``,
    then ``prepare(im)``) or whose file is cut short is an InputError naming the image's file and the problem (was:
    Pillow's bare AssertionError, no message at all, and an OSError naming no file); one read inside its block is
    taken."""
    from PIL import Image

    with Image.open(PORTRAIT) as closed:
        pass
    with pytest.raises(InputError, match=r"portrait \(a PIL image, .*portrait.png\): .* was its file closed"):
        anim.prepare(closed)
    cut = tmp_path / "cut.png"
    cut.write_bytes(PORTRAIT.read_bytes()[:20000])
    with Image.open(cut) as short, pytest.raises(InputError, match=r"a PIL image, .*cut.png\): .*truncated"):
        anim.paste_back(short)
    with Image.open(PORTRAIT) as read:
        read.load()
    assert anim.portrait_inputs(read).digest() == anim.portrait_inputs(PORTRAIT).digest()


def test_an_animators_image_size_and_weights_seed_are_whole_numbers_numpy_ones_too(tmp_path: Path) -> None:
    """Animator.demo(seed=, image_size=), from_weights(image_size=) and run_image_size take a numpy integer as the int
    it is, and refuse a float, a string or a bool naming the argument (was: image_size=np.int64(192) refused as "192:
    must be a multiple of 64 from 128 to 1024", image_size="192" as "192: must be ...", seed="1" a TypeError from
    the weights' name, seed=1.5 and seed=True taken as models named tiny-random-1.5 and tiny-random-True)."""
    from megactor_rt.runtime.animator import run_image_size

    assert Animator.demo(seed=np.int64(3), image_size=np.int64(192)).image_size == 192
    for options, says in (({"image_size": 192.0}, "image_size must be a whole number .* got 192.0"),
                          ({"image_size": "192"}, "image_size must be a whole number .* got '192'"),
                          ({"seed": "1"}, "seed must be a whole number .* got '1'"),
                          ({"seed": 1.5}, "seed must be a whole number"), ({"seed": True}, "seed must be a whole")):
        with pytest.raises(InputError, match=says):
            Animator.demo(**options)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="image_size must be a whole number .* got '192'"):
        Animator.from_weights(tmp_path, image_size="192")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="image_size must be a whole number .* got '192'"):
        run_image_size(tmp_path, image_size="192")  # type: ignore[arg-type]


def test_an_async_progress_function_is_refused_saying_how_to_report_to_the_event_loop(anim: Animator,
                                                                                     tmp_path: Path) -> None:
    """on_progress is called in the thread doing the run's work: an ``async def`` one (the natural guess beside
    animate_async) is refused before any work, saying how to hand reports to the loop (was: each call made a
    coroutine nobody awaited, every report lost with only a RuntimeWarning, and the frames came as if all was well)."""
    import asyncio

    state = anim.prepare(PORTRAIT)
    got: list[object] = []

    async def report(p: object) -> None:
        got.append(p)

    says = "on_progress must be a plain function, not an async one .* loop.call_soon_threadsafe"

    async def frames() -> int:
        return len([f async for f in anim.animate_async(state, DRIVER, on_progress=report)])

    with pytest.raises(InputError, match=says):
        asyncio.run(frames())
    with pytest.raises(InputError, match=says):
        next(anim.animate(state, DRIVER, on_progress=report))
    with pytest.raises(InputError, match=says):
        anim.animate_to_file(PORTRAIT, DRIVER, tmp_path / "o.mp4", on_progress=report)
    assert got == [] and not (tmp_path / "o.mp4").exists()
