"""Tests for megactor_rt.kernels: references vs independent computations, the host build of the
element code vs the references (CPU), the injected-bug build, dispatch/fallback, validation, and
(marked `gpu`) the CUDA kernels vs the references.

Host-library tests skip locally when `build/kernels/libmegactor_kernels_host*.so` is missing and fail
under CI (env CI=true), where `cmake -S . -B build && cmake --build build -j2` must have run.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from megactor_rt import kernels as K
from megactor_rt.kernels import _lib

FLOATS = [torch.float32, torch.float16, torch.bfloat16]


def _tol(dtype: torch.dtype) -> float:
    # float32: a few ulps (ATen's own CPU/CUDA loops differ in FMA use); reduced: 1 ulp of the dtype.
    return 4 * torch.finfo(torch.float32).eps if dtype == torch.float32 else torch.finfo(dtype).eps


def _frame(h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=g)  # (H, W, 3)


def _need_lib(lib: _lib.LoadedLib) -> None:
    if lib.available:
        return
    msg = f"host kernel library not built ({lib.reason})"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{msg}; CI must build it first: {_lib.BUILD_COMMAND}")
    pytest.skip(msg)


@pytest.fixture(scope="module")
def host() -> None:
    _need_lib(_lib.host_lib())


@pytest.fixture(scope="module")
def host_bug() -> None:
    _need_lib(_lib.host_lib(bug=True))


# ------------------------------------------------------------------------------------------
# independent straightforward computations (float64 numpy)
# ------------------------------------------------------------------------------------------
def _naive_bilinear(img: np.ndarray, size: int) -> np.ndarray:
    """(h, w, 3) float64 -> (size, size, 3), align_corners=False, written out per axis."""

    def axis(n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.maximum((np.arange(size) + 0.5) * n_in / size - 0.5, 0.0)
        i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        return i0, np.minimum(i0 + 1, n_in - 1), src - i0

    (y0, y1, ly), (x0, x1, lx) = axis(img.shape[0]), axis(img.shape[1])
    ly, lx = ly[:, None, None], lx[None, :, None]
    top = img[y0][:, x0] * (1 - lx) + img[y0][:, x1] * lx
    bot = img[y1][:, x0] * (1 - lx) + img[y1][:, x1] * lx
    return top * (1 - ly) + bot * ly


def _naive_preprocess(frame: torch.Tensor, crop, keep, size: int) -> np.ndarray:
    top, left, bottom, right = crop
    img = _naive_bilinear(frame[top:bottom, left:right].numpy().astype(np.float64), size)
    if keep is not None:
        mask = np.zeros((size, size, 1))
        mask[max(keep[0], 0) : max(keep[2], 0), max(keep[1], 0) : max(keep[3], 0)] = 1
        img = img * mask
    grey = np.clip(img @ np.array([0.2989, 0.5870, 0.1140]), 0, 255) / 255
    return np.broadcast_to(grey, (3, size, size))


# ATen's source coordinates are float32: a position error of a few ulps of in_size (~in_size * 2^-23 px)
# moves a normalised output by up to that much (neighbouring pixels differ by at most 255 / 255).
@pytest.mark.parametrize(
    "hw,crop,keep,size",
    [
        ((37, 53), (3, 4, 30, 50), None, 41),  # odd, downscale
        ((37, 53), (3, 4, 30, 50), (5, 2, 30, 39), 64),  # upscale + keep
        ((9, 9), (4, 4, 5, 5), None, 7),  # 1x1 crop
        ((120, 200), (0, 0, 120, 200), (-5, 10, 500, 60), 33),  # keep partly outside
        ((64, 64), (0, 0, 64, 64), None, 64),  # identity
        ((5, 300), (1, 0, 4, 300), None, 17),  # extreme aspect
    ],
)
def test_preprocess_ref_matches_naive(hw, crop, keep, size):
    frame = _frame(*hw)
    out = K.preprocess_frame_ref(frame, crop, keep, size=size)
    assert out.shape == (3, size, size) and out.dtype == torch.float32
    atol = 4 * max(crop[2] - crop[0], crop[3] - crop[1]) * 2.0**-24 + 1e-6
    np.testing.assert_allclose(out.numpy(), _naive_preprocess(frame, crop, keep, size), rtol=0, atol=atol)


def test_preprocess_ref_special_cases():
    frame = _frame(9, 9)
    one = K.preprocess_frame_ref(frame, (2, 3, 3, 4), None, size=5)  # 1x1 crop -> constant
    r, g, b = frame[2, 3].tolist()
    expected = (
        min(max(np.float32(0.2989) * r + np.float32(0.5870) * g + np.float32(0.1140) * b, 0), 255) / 255
    )
    assert torch.allclose(one, torch.full_like(one, float(expected)), atol=1e-7)
    masked = K.preprocess_frame_ref(frame, (0, 0, 9, 9), (2, 3, 5, 7), size=9)
    assert (
        masked[:, :2].abs().max() == 0 and masked[:, 5:].abs().max() == 0 and masked[:, 2:5, 3:7].min() >= 0
    )
    assert torch.equal(masked[0], masked[1]) and torch.equal(masked[1], masked[2])
    half = K.preprocess_frame_ref(frame, (0, 0, 9, 9), None, size=16, dtype=torch.float16)
    assert half.dtype == torch.float16
    assert torch.equal(half, K.preprocess_frame_ref(frame, (0, 0, 9, 9), None, size=16).half())


def _naive_ddim(eps_sum, counts, x, g, a_t, a_p):
    s, c, x = (t.double().numpy() for t in (eps_sum, counts, x))
    c = c[None, :, None, None]
    eps = s[0] / c if s.shape[0] == 1 else s[0] / c + g * (s[1] / c - s[0] / c)
    x0 = (x[0] - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
    return (np.sqrt(a_p) * x0 + np.sqrt(1 - a_p) * eps)[None], eps[None]


@pytest.mark.parametrize("halves", [1, 2])
@pytest.mark.parametrize("shape", [(4, 16, 8, 8), (1, 1, 1, 1), (3, 5, 7, 9)])
def test_ddim_ref_matches_naive(halves, shape):
    g = torch.Generator().manual_seed(1)
    eps_sum = torch.randn((halves, *shape), generator=g) * 3
    counts = torch.randint(1, 4, (shape[1],), generator=g).float()
    x = torch.randn((1, *shape), generator=g)
    eps_out = torch.empty_like(x)
    out = K.ddim_cfg_update_ref(eps_sum, counts, x, 7.5, 0.3, 0.6, eps_out=eps_out)
    want, want_eps = _naive_ddim(eps_sum, counts, x, 7.5, 0.3, 0.6)
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(eps_out.numpy(), want_eps, rtol=1e-5, atol=1e-5)


def test_ddim_ref_equals_diffusers_step():
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        set_alpha_to_one=False,
        clip_sample=False,
    )
    sched.set_timesteps(25)
    t, prev = int(sched.timesteps[3]), int(sched.timesteps[4])
    g = torch.Generator().manual_seed(2)
    eps_sum, x = torch.randn(2, 4, 6, 5, 7, generator=g), torch.randn(1, 4, 6, 5, 7, generator=g)
    counts = torch.tensor([1.0, 2, 3, 3, 2, 1])
    eps_u, eps_c = eps_sum[0] / counts.view(1, -1, 1, 1), eps_sum[1] / counts.view(1, -1, 1, 1)
    eps = (eps_u + 3.5 * (eps_c - eps_u)).unsqueeze(0)
    want = sched.step(eps, t, x, eta=0.0).prev_sample
    got = K.ddim_cfg_update_ref(eps_sum, counts, x, 3.5, sched.alphas_cumprod[t], sched.alphas_cumprod[prev])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def _sqrt32(x: torch.Tensor) -> float:
    """The correctly rounded float32 square root of a float32 value (through float64, which holds it exactly)."""
    return float(np.float32(np.sqrt(np.float64(float(x)))))


def test_ddim_coefficients_are_diffusers_float32_values():
    """The four DDIM coefficients are computed in float32 as diffusers computes them from its float32
    ``alphas_cumprod`` (``1 - a`` and the square roots in float32), bit for bit, not in float64: the correctly
    rounded float32 square roots, as CUDA's ``sqrtf`` gives them to upstream's GPU runs. (torch's float32 sqrt on
    the CPU, which diffusers' ``** 0.5`` calls there, is 1 unit in the last place off on some CPUs: on an AMD EPYC
    with AVX-512, sqrt(1 - a) at t=921 gave 0.99804121 against 0.99804115; it was the expected value here until
    2026-11-28, when CI first ran on such a machine.)"""
    from megactor_rt.models.scheduler import DDIM

    alphas = DDIM().alphas_cumprod  # float32
    for t, prev in ((961, 921), (501, 461), (41, 1), (1, 0)):
        a_t, a_p = alphas[t], alphas[prev]
        want = tuple(_sqrt32(v) for v in (a_t, 1 - a_t, a_p, 1 - a_p))  # 1 - a: a float32 tensor's subtraction
        assert K.ddim_coefficients(a_t, a_p) == want
        assert K.ddim_coefficients(float(a_t), float(a_p)) == want  # a Python float of the same value
        assert want[1] != float(np.sqrt(1 - np.float64(float(a_t)))) or t == 501  # float64's 1 - a differs


def test_to_uint8_ref_matches_naive():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 5, 7, generator=g) * 0.8
    x[0, :, 0, :5] = torch.tensor([-1.0, 1.0, 0.0, -3.0, 3.0]).view(1, 5)  # -> 0, 255, 127, 0, 255
    out = K.latents_to_uint8_ref(x)
    v = x.numpy().astype(np.float32)
    want = np.trunc(np.clip(v / np.float32(2) + np.float32(0.5), 0, 1) * np.float32(255)).astype(np.uint8)
    assert out.shape == (2, 5, 7, 3) and out.dtype == torch.uint8
    np.testing.assert_array_equal(out.numpy(), want.transpose(0, 2, 3, 1))
    assert out[0, 0, :5, 0].tolist() == [0, 255, 127, 0, 255]


# ------------------------------------------------------------------------------------------
# host build of the element code vs the references (same grids the GPU tests use)
# ------------------------------------------------------------------------------------------
PRE_CASES = [
    ((37, 53), (3, 4, 30, 50), None, 41),
    ((37, 53), (3, 4, 30, 50), (5, 2, 30, 39), 64),
    ((9, 9), (4, 4, 5, 5), None, 7),
    ((9, 9), (0, 0, 9, 9), (0, 0, 1, 1), 1),
    ((120, 200), (7, 11, 119, 190), (-5, 10, 500, 60), 33),
    ((337, 453), (0, 0, 337, 453), None, 512),
    ((64, 64), (0, 0, 64, 64), None, 64),
]
DDIM_SHAPES = [(1, 1, 1, 1), (4, 16, 8, 8), (3, 5, 7, 9), (4, 2, 13, 1)]
IMG_SHAPES = [(1, 3, 1, 1), (2, 3, 5, 7), (3, 3, 31, 17)]


def _ddim_inputs(halves, shape, dtype, device="cpu", seed=4):
    g = torch.Generator().manual_seed(seed)
    eps_sum = (torch.randn((halves, *shape), generator=g) * 3).to(device, dtype)
    counts = torch.randint(1, 5, (shape[1],), generator=g).float().to(device)
    x = torch.randn((1, *shape), generator=g).to(device, dtype)
    return eps_sum, counts, x


def _images(shape, dtype, device="cpu", seed=5):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.7
    x.view(-1)[:3] = torch.tensor([-1.0, 1.0, float("nan")])[: x.numel()]
    return x.to(device, dtype)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("hw,crop,keep,size", PRE_CASES)
def test_preprocess_host_matches_ref(host, hw, crop, keep, size, dtype):
    frame = _frame(*hw)
    got = K.preprocess_frame_host(frame, crop, keep, size=size, dtype=dtype)
    want = K.preprocess_frame_ref(frame, crop, keep, size=size, dtype=dtype)
    torch.testing.assert_close(got, want, rtol=0, atol=_tol(dtype))


def test_preprocess_host_strided_frame(host):
    big = _frame(40, 60)
    frame = big[::2, 1::2]  # non-contiguous (20, 30, 3) view
    got = K.preprocess_frame_host(frame, (1, 2, 19, 29), None, size=23)
    want = K.preprocess_frame_ref(frame, (1, 2, 19, 29), None, size=23)
    torch.testing.assert_close(got, want, rtol=0, atol=_tol(torch.float32))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("halves", [1, 2])
@pytest.mark.parametrize("shape", DDIM_SHAPES)
def test_ddim_host_matches_ref(host, shape, halves, dtype):
    eps_sum, counts, x = _ddim_inputs(halves, shape, dtype)
    eps_h, eps_r = torch.empty_like(x, dtype=torch.float32), torch.empty_like(x, dtype=torch.float32)
    got = K.ddim_cfg_update_host(eps_sum, counts, x, 5.0, 0.25, 0.55, eps_out=eps_h)
    want = K.ddim_cfg_update_ref(eps_sum, counts, x, 5.0, 0.25, 0.55, eps_out=eps_r)
    assert got.dtype == dtype
    scale = max(want.abs().max().item(), 1.0)
    torch.testing.assert_close(got, want, rtol=_tol(dtype), atol=_tol(dtype) * scale)
    torch.testing.assert_close(eps_h, eps_r, rtol=_tol(torch.float32), atol=_tol(torch.float32) * scale)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", IMG_SHAPES)
def test_to_uint8_host_matches_ref(host, shape, dtype):
    x = _images(shape, dtype)
    assert torch.equal(K.latents_to_uint8_host(x), K.latents_to_uint8_ref(x))


def test_host_fp16_conversion_is_exact(host):
    # Values around fp16 rounding boundaries, subnormals and overflow, through the eps_out store path.
    vals = torch.tensor(
        [
            0.0,
            -0.0,
            1e-8,
            3e-8,
            6e-8,
            1e-5,
            0.1,
            1 / 3,
            2049.0,
            2051.0,
            65504.0,
            65519.0,
            65520.0,
            1e6,
            -7.3e-6,
        ]
    )
    eps_sum = vals.view(1, 1, 1, 1, -1)
    x = torch.zeros(1, 1, 1, 1, vals.numel())
    eps_out = torch.empty(1, 1, 1, 1, vals.numel(), dtype=torch.float16)
    K.ddim_cfg_update_host(eps_sum, torch.ones(1), x, 1.0, 0.5, 0.5, eps_out=eps_out)
    assert torch.equal(eps_out.view(-1).float(), vals.half().float())


# ------------------------------------------------------------------------------------------
# injected bug: a wrong element function must be caught by the comparisons above
# ------------------------------------------------------------------------------------------
def test_bug_lib_is_the_bug_build(host, host_bug):
    assert "inject_bug=1" in _lib.host_lib(bug=True).build_info
    assert "inject_bug=0" in _lib.host_lib().build_info


def test_bug_lib_disagrees_with_ref(host_bug):
    hw, crop, keep, size = PRE_CASES[1]
    frame = _frame(*hw)
    bad = K.preprocess_frame_host(frame, crop, keep, size=size, bug=True)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(
            bad, K.preprocess_frame_ref(frame, crop, keep, size=size), rtol=0, atol=_tol(torch.float32)
        )
    eps_sum, counts, x = _ddim_inputs(2, (4, 16, 8, 8), torch.float32)
    bad = K.ddim_cfg_update_host(eps_sum, counts, x, 5.0, 0.25, 0.55, bug=True)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(
            bad,
            K.ddim_cfg_update_ref(eps_sum, counts, x, 5.0, 0.25, 0.55),
            rtol=_tol(torch.float32),
            atol=_tol(torch.float32),
        )
    img = _images((2, 3, 5, 7), torch.float32)
    assert not torch.equal(K.latents_to_uint8_host(img, bug=True), K.latents_to_uint8_ref(img))


# ------------------------------------------------------------------------------------------
# dispatch, fallback, status, validation (CPU)
# ------------------------------------------------------------------------------------------
def test_dispatch_uses_ref_on_cpu(monkeypatch):
    def boom(*_a, **_k):
        raise AssertionError("kernel path taken for CPU tensors")

    monkeypatch.setattr(K.ops, "_run", boom)
    frame = _frame(20, 30)
    assert torch.equal(
        K.preprocess_frame(frame, (0, 0, 20, 30), None, 16),
        K.preprocess_frame_ref(frame, (0, 0, 20, 30), None, 16),
    )
    eps_sum, counts, x = _ddim_inputs(2, (2, 3, 4, 5), torch.float32)
    assert torch.equal(
        K.ddim_cfg_update(eps_sum, counts, x, 2.0, 0.4, 0.7),
        K.ddim_cfg_update_ref(eps_sum, counts, x, 2.0, 0.4, 0.7),
    )
    img = _images((1, 3, 4, 4), torch.float16)
    assert torch.equal(K.latents_to_uint8(img), K.latents_to_uint8_ref(img))


def test_cuda_entry_rejects_cpu_tensors():
    frame = _frame(8, 8)
    with pytest.raises(ValueError, match="preprocess_frame_cuda takes CUDA tensors"):
        K.preprocess_frame_cuda(frame, (0, 0, 8, 8), None, 8)


def test_missing_library_message_names_build_command(monkeypatch, tmp_path):
    monkeypatch.setenv(_lib.ENV_VAR, str(tmp_path / "nope.so"))
    monkeypatch.setattr(_lib, "_REPO_BUILD_DIR", tmp_path)
    monkeypatch.setattr(_lib, "_HERE", tmp_path)
    _lib.reset_cache()
    try:
        status = K.kernels_status()
        assert status["available"] is False and status["library"] is None
        assert _lib.BUILD_COMMAND in status["reason"]
        frame = _frame(8, 8).cuda() if torch.cuda.is_available() else None
        if frame is not None:
            with pytest.raises(RuntimeError, match="cmake -S . -B build"):
                K.preprocess_frame_cuda(frame, (0, 0, 8, 8), None, 8)
    finally:
        _lib.reset_cache()


@pytest.mark.parametrize("archs, capability, runs", [
    (["80-real", "86-real", "90"], (9, 0), True),  # the default build on an H100
    (["80-real", "86-real", "90"], (8, 9), True),  # L4 / RTX 4090: 86 SASS runs on 8.9
    (["80-real", "86-real", "90"], (10, 0), True),  # Blackwell: compute_90 PTX, compiled by the driver
    (["80-real", "86-real", "90"], (7, 5), False),  # T4: nothing that old
    (["90"], (8, 0), False),  # bench/gpu_all.sh's build on an A100: "no kernel image is available"
    (["90-real"], (10, 0), False),  # SASS does not cross major versions
    (["80-virtual"], (9, 0), True),
    (["90a"], (9, 0), True),
    (["90a"], (10, 0), False),  # arch-specific code: that GPU only
    (["100f"], (10, 3), True),
    (["native"], (7, 0), None),  # cannot tell: try it
    ([], (9, 0), None),
])
def test_compiled_architectures_decide_where_the_library_runs(archs, capability, runs):
    assert _lib.arch_runs_on(archs, capability) is runs


def test_a_library_built_for_other_gpus_falls_back(monkeypatch):
    """A CUDA library built for sm_90 only, on a compute capability 8.0 GPU: unavailable there, with the
    rebuild command for that GPU (was: used, and every launch failed with "no kernel image is available")."""
    built = _lib.LoadedLib(name=_lib.CUDA_LIB_NAME, lib=object(), path=Path("/x/libmegactor_kernels.so"),  # type: ignore[arg-type]
                           build_info="cuda;archs=90")
    monkeypatch.setattr(_lib, "cuda_lib", lambda: built)
    assert _lib.cuda_lib_for((9, 0)) is built
    other = _lib.cuda_lib_for((8, 0))
    assert not other.available and "built for CUDA architectures 90" in other.reason
    assert "compute capability 8.0" in other.reason and "-DCMAKE_CUDA_ARCHITECTURES=80" in other.reason
    assert _lib.compiled_archs("cuda;archs=80-real,86-real,90") == ["80-real", "86-real", "90"]
    assert _lib.compiled_archs("host;x86_64") == [] and _lib.compiled_archs("cuda;archs=unknown") == []


def test_doctor_says_whether_the_library_runs_on_this_gpu(monkeypatch):
    built = _lib.LoadedLib(name=_lib.CUDA_LIB_NAME, lib=object(), path=Path("/x/libmegactor_kernels.so"),  # type: ignore[arg-type]
                           build_info="cuda;archs=90")
    monkeypatch.setattr(_lib, "cuda_lib", lambda: built)
    monkeypatch.setattr(_lib, "_gpu_capability", lambda: (8, 0))
    status = _lib.kernels_status()
    assert status["this_gpu"].startswith("compute capability 8.0: ") and "-DCMAKE_CUDA_ARCHITECTURES=80" in \
        status["this_gpu"]
    monkeypatch.setattr(_lib, "_gpu_capability", lambda: (9, 0))
    assert _lib.kernels_status()["this_gpu"] == "compute capability 9.0: the library runs here"
    monkeypatch.setattr(_lib, "_gpu_capability", lambda: None)
    assert "this_gpu" not in _lib.kernels_status()


def test_the_environment_variable_is_the_only_place_searched(monkeypatch, tmp_path):
    """With $MEGACTOR_KERNELS_LIB set, a library it names that is missing is reported as such, not replaced by
    the repository's build (was: silently used build/kernels/); a folder there holds the libraries."""
    if not _lib.host_lib().available:
        pytest.skip(f"host kernel library not built: {_lib.host_lib().reason}")
    built = _lib.host_lib().path
    monkeypatch.setenv(_lib.ENV_VAR, str(tmp_path / "nope.so"))
    _lib.reset_cache()
    try:
        lib = _lib.host_lib()
        assert not lib.available and lib.tried == [str(tmp_path / _lib.HOST_LIB_NAME)]
        assert "$MEGACTOR_KERNELS_LIB is set" in lib.reason
        assert not _lib.cuda_lib().available and _lib.cuda_lib().tried == [str(tmp_path / "nope.so")]
        monkeypatch.setenv(_lib.ENV_VAR, str(built.parent))  # a folder
        _lib.reset_cache()
        assert _lib.host_lib().path == built
    finally:
        _lib.reset_cache()


def test_kernels_status_shape():
    """A CUDA build reports the architectures it was configured with: the CMakeLists default (80, 86, 90)
    unless the build folder's cache names others (bench/gpu_all.sh builds for 90 only)."""
    import re
    from pathlib import Path

    status = K.kernels_status()
    assert set(status) >= {"available", "library", "reason", "compute_capabilities", "build_command"}
    if status["library"] and status["build_info"].startswith("cuda"):
        cache = Path(status["library"]).parents[1] / "CMakeCache.txt"
        chosen = re.search(r"^CMAKE_CUDA_ARCHITECTURES:\w+=(.+)$", cache.read_text(), re.M) if cache.is_file() else None
        archs = chosen.group(1) if chosen else "80-real;86-real;90"
        assert {a.split("-")[0] for a in archs.split(";")} <= set(status["compute_capabilities"])


@pytest.mark.parametrize(
    "call",
    [
        lambda: K.preprocess_frame_ref(torch.zeros(4, 4, 3), (0, 0, 4, 4)),  # float frame
        lambda: K.preprocess_frame_ref(torch.zeros(4, 4, 4, dtype=torch.uint8), (0, 0, 4, 4)),  # 4 channels
        lambda: K.preprocess_frame_ref(torch.zeros(4, 4, 3, dtype=torch.uint8), (0, 0, 5, 4)),  # crop too big
        lambda: K.preprocess_frame_ref(torch.zeros(4, 4, 3, dtype=torch.uint8), (2, 0, 2, 4)),  # empty crop
        lambda: K.preprocess_frame_ref(torch.zeros(4, 4, 3, dtype=torch.uint8), (0, 0, 4)),  # 3 values
        lambda: K.preprocess_frame_ref(torch.zeros(4, 4, 3, dtype=torch.uint8), (0, 0, 4, 4), size=0),
        lambda: K.preprocess_frame_ref(torch.zeros(4, 4, 3, dtype=torch.uint8), (0, 0, 4, 5)),  # crop too wide
        lambda: K.preprocess_frame_ref(torch.zeros(4, 4, 3, dtype=torch.uint8), (0, 0, 4, 4), size=4.0),  # float
        lambda: K.preprocess_frame_ref(
            torch.zeros(4, 4, 3, dtype=torch.uint8), (0, 0, 4, 4), dtype=torch.int32
        ),
        lambda: K.ddim_cfg_update_ref(
            torch.zeros(3, 1, 2, 2, 2), torch.ones(2), torch.zeros(1, 1, 2, 2, 2), 1, 0.5, 0.5
        ),
        lambda: K.ddim_cfg_update_ref(
            torch.zeros(2, 1, 2, 2, 2), torch.ones(3), torch.zeros(1, 1, 2, 2, 2), 1, 0.5, 0.5
        ),
        lambda: K.ddim_cfg_update_ref(
            torch.zeros(2, 1, 2, 2, 2), torch.ones(2), torch.zeros(1, 1, 2, 2, 2), 1, 0.0, 0.5
        ),
        lambda: K.ddim_cfg_update_ref(  # alpha_prev 0 (the update divides by neither, but it is no alpha-bar)
            torch.zeros(2, 1, 2, 2, 2), torch.ones(2), torch.zeros(1, 1, 2, 2, 2), 1, 0.5, 0.0
        ),
        lambda: K.ddim_cfg_update_ref(  # latents of batch 2
            torch.zeros(2, 1, 2, 2, 2), torch.ones(2), torch.zeros(2, 1, 2, 2, 2), 1, 0.5, 0.5
        ),
        lambda: K.ddim_cfg_update_ref(  # eps sums with 2 channels for latents with 1 (would broadcast)
            torch.zeros(2, 2, 2, 2, 2), torch.ones(2), torch.zeros(1, 1, 2, 2, 2), 1, 0.5, 0.5
        ),
        lambda: K.ddim_cfg_update_ref(  # counts on another device (meta: no GPU needed)
            torch.zeros(2, 1, 2, 2, 2), torch.ones(2, device="meta"), torch.zeros(1, 1, 2, 2, 2), 1, 0.5, 0.5
        ),
        lambda: K.ddim_cfg_update_ref(
            torch.zeros(2, 1, 2, 2, 2, dtype=torch.int64),
            torch.ones(2),
            torch.zeros(1, 1, 2, 2, 2),
            1,
            0.5,
            0.5,
        ),
        lambda: K.ddim_cfg_update_ref(
            torch.zeros(2, 1, 2, 2, 2),
            torch.ones(2),
            torch.zeros(1, 1, 2, 2, 2),
            1,
            0.5,
            0.5,
            eps_out=torch.zeros(1, 1, 2, 2, 3),
        ),
        lambda: K.ddim_cfg_update_ref(  # eps_out of the right shape but not contiguous (the kernels write it flat)
            torch.zeros(2, 1, 2, 2, 2),
            torch.ones(2),
            torch.zeros(1, 1, 2, 2, 2),
            1,
            0.5,
            0.5,
            eps_out=torch.zeros(1, 1, 2, 2, 2).transpose(3, 4),
        ),
        lambda: K.latents_to_uint8_ref(torch.zeros(1, 4, 2, 2)),
        lambda: K.latents_to_uint8_ref(torch.zeros(1, 3, 2, 2, dtype=torch.uint8)),
        lambda: K.latents_to_uint8(torch.zeros(3, 2, 2)),
    ],
)
def test_validation_raises_value_error(call):
    with pytest.raises(ValueError):
        call()


# ------------------------------------------------------------------------------------------
# GPU: the CUDA kernels (launch/indexing glue) vs the references on the same grids
# ------------------------------------------------------------------------------------------
def _need_cuda_lib() -> None:
    lib = _lib.cuda_lib()
    if not lib.available:
        pytest.fail(f"CUDA available but kernel library unusable: {lib.reason}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("hw,crop,keep,size", PRE_CASES)
def test_preprocess_cuda_matches_ref(hw, crop, keep, size, dtype):
    _need_cuda_lib()
    frame = _frame(*hw).cuda()
    got = K.preprocess_frame(frame, crop, keep, size=size, dtype=dtype)
    want = K.preprocess_frame_ref(frame.cpu(), crop, keep, size=size, dtype=dtype)
    assert got.is_cuda and got.shape == (3, size, size)
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=_tol(dtype))
    strided = _frame(2 * hw[0], 2 * hw[1]).cuda()[::2, ::2]
    torch.testing.assert_close(
        K.preprocess_frame_cuda(strided, crop, keep, size=size, dtype=dtype).cpu(),
        K.preprocess_frame_ref(strided.cpu(), crop, keep, size=size, dtype=dtype),
        rtol=0,
        atol=_tol(dtype),
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("halves", [1, 2])
@pytest.mark.parametrize("shape", [*DDIM_SHAPES, (4, 48, 64, 64)])
def test_ddim_cuda_matches_ref(shape, halves, dtype):
    _need_cuda_lib()
    eps_sum, counts, x = _ddim_inputs(halves, shape, dtype, device="cuda")
    eps_k = torch.empty_like(x)
    got = K.ddim_cfg_update(eps_sum, counts, x, 5.0, 0.25, 0.55, eps_out=eps_k)
    eps_r = torch.empty_like(x, device="cpu")
    want = K.ddim_cfg_update_ref(eps_sum.cpu(), counts.cpu(), x.cpu(), 5.0, 0.25, 0.55, eps_out=eps_r)
    scale = max(want.float().abs().max().item(), 1.0)
    torch.testing.assert_close(got.cpu(), want, rtol=_tol(dtype), atol=_tol(dtype) * scale)
    torch.testing.assert_close(eps_k.cpu(), eps_r, rtol=_tol(dtype), atol=_tol(dtype) * scale)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [*IMG_SHAPES, (16, 3, 512, 512)])
def test_to_uint8_cuda_matches_ref(shape, dtype):
    _need_cuda_lib()
    x = _images(shape, dtype, device="cuda")
    got = K.latents_to_uint8(x)
    assert got.is_cuda and torch.equal(got.cpu(), K.latents_to_uint8_ref(x.cpu()))


@pytest.mark.gpu
def test_to_uint8_cuda_past_32_bit_indices():
    """2731 frames at 512 px: 3 x 716 M output pixels pass 2^31, so the kernel takes its 64-bit index path
    (never run by the shapes above). The images at both ends against the reference (about 7 GB of GPU memory)."""
    _need_cuda_lib()
    n = 2731
    assert 3 * n * 512 * 512 > 2**31 - 1
    x = torch.empty(n, 3, 512, 512, dtype=torch.float16, device="cuda")
    x[:4] = _images((4, 3, 512, 512), torch.float16, device="cuda")
    x[-4:] = _images((4, 3, 512, 512), torch.float16, device="cuda", seed=6)
    x[4:-4] = 0.25
    got = K.latents_to_uint8(x)
    for part in (slice(0, 4), slice(n - 4, n)):
        assert torch.equal(got[part].cpu(), K.latents_to_uint8_ref(x[part].cpu()))
    assert torch.equal(got[n // 2].cpu(), K.latents_to_uint8_ref(x[n // 2:n // 2 + 1].cpu())[0])


@pytest.mark.gpu
def test_cuda_runs_on_current_stream():
    _need_cuda_lib()
    s = torch.cuda.Stream()
    x = _images((4, 3, 64, 64), torch.float16, device="cuda")
    with torch.cuda.stream(s):
        s.wait_stream(torch.cuda.current_stream())
        got = K.latents_to_uint8_cuda(x)
    s.synchronize()
    assert torch.equal(got.cpu(), K.latents_to_uint8_ref(x.cpu()))
