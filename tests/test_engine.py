"""CPU tests of the engine package: manifest, cache keys, sidecars, foreign plans, build skipping, selection.

Nothing here needs TensorRT or a GPU: plans are fake bytes written through the same code path as real ones,
and the TensorRT build code itself runs against ``tests/fake_tensorrt.py``, a stand-in modelling the real
bindings' behaviour (return values, enums, failure modes). The runner's execution needs CUDA and TensorRT
(``tests/test_engine_trt.py``, marker ``trt``).
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import re
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from megactor_rt.engine import builder as builder_mod
from megactor_rt.engine.builder import BuildOptions, build_engines, make_record, plan_jobs, run_jobs
from megactor_rt.engine.cache import (
    PLAN_NAME,
    SIDECAR_NAME,
    DeviceInfo,
    EngineKey,
    EngineRecord,
    iter_plan_dirs,
    load_valid_record,
    plan_dir,
    read_sidecar,
    tensorrt_cuda_flavour,
    write_plan,
)
from megactor_rt.engine.manifest import (
    GraphEntry,
    ManifestError,
    Precision,
    ProfileShapes,
    TensorSpec,
    check_profiles_cover,
    load_manifest,
)
from megactor_rt.engine.runner import TensorRTRunner
from megactor_rt.engine.select import parse_submodel_list, select_backends
from megactor_rt.errors import BackendUnavailable, EngineMismatch, InputError

H100 = DeviceInfo("NVIDIA H100 80GB HBM3", (9, 0), "11.1.0.106")
FAKE_IO = {"inputs": {"x": {"dtype": "float16", "shape": [-1, 8]}},
           "outputs": {"y": {"dtype": "float16", "shape": [-1, 4]}}}


# -- fixtures --------------------------------------------------------------------------------------------

def _write_onnx(path: Path) -> str:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["batch", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["batch", 4])
    w = helper.make_tensor("w", TensorProto.FLOAT16, [8, 4], [0.5] * 32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "tiny", [x], [y], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _graph_json(file: str, sha: str, submodel: str = "vae_decoder", precision: str = "fp16") -> dict:
    return {"file": file, "submodel": submodel, "precision": precision, "sha256": sha,
            "inputs": {"x": {"dtype": "float16", "shape": ["batch", 8]}},
            "outputs": {"y": {"dtype": "float16", "shape": ["batch", 4]}},
            "profiles": {"default": {"x": [[1, 8], [2, 8], [4, 8]]}, "big": {"x": [[1, 8], [8, 8], [16, 8]]}}}


@pytest.fixture()
def onnx_dir(tmp_path: Path) -> Path:
    d = tmp_path / "onnx"
    d.mkdir()
    sha = _write_onnx(d / "vae_decoder.fp16.onnx")
    manifest = {"format": 1, "graphs": {"vae_decoder_fp16": _graph_json("vae_decoder.fp16.onnx", sha)}}
    (d / "manifest.json").write_text(json.dumps(manifest))
    return d


class FakeBuilder:
    """Stands in for the TensorRT build: returns fixed bytes and counts calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, job, options, cache_path):
        self.calls.append(f"{job.graph.name}[{job.profile_name}]")
        return b"PLAN:" + job.key.digest().encode(), FAKE_IO


def _built(onnx_dir: Path, engine_dir: Path, device: DeviceInfo = H100, **opts) -> tuple[list, FakeBuilder]:
    fake = FakeBuilder()
    options = BuildOptions(**opts)
    jobs = plan_jobs(load_manifest(onnx_dir), device, engine_dir, options)
    return run_jobs(jobs, device, engine_dir, options, fake), fake


# -- manifest --------------------------------------------------------------------------------------------

def test_manifest_loads_graphs_and_profiles(onnx_dir: Path) -> None:
    m = load_manifest(onnx_dir)
    g = m.graphs["vae_decoder_fp16"]
    assert g.submodel == "vae_decoder" and g.precision == "fp16"
    assert g.inputs["x"].shape == ("batch", 8) and g.inputs["x"].dynamic_dims == {0: "batch"}
    assert g.profile("default")["x"] == ProfileShapes((1, 8), (2, 8), (4, 8))
    assert g.path == onnx_dir / "vae_decoder.fp16.onnx"
    assert [x.name for x in m.for_submodel("vae_decoder", "fp16")] == ["vae_decoder_fp16"]
    with pytest.raises(ManifestError, match="no profile 'w16'.*big"):
        g.profile("w16")


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda m: m.update(format=2), "'format' must be 1"),
    (lambda m: m["graphs"]["g"].update(submodel="unet"), "graphs.g: unknown submodel 'unet'"),
    (lambda m: m["graphs"]["g"].update(sha256="xyz"), "sha256"),
    (lambda m: m["graphs"]["g"]["inputs"]["x"].update(dtype="float64"), "graphs.g.inputs.x: 'dtype'"),
    (lambda m: m["graphs"]["g"]["profiles"]["default"].update(x=[[1, 8], [2, 8]]), "must be \\[\\[min\\]"),
    (lambda m: m.update(graphs={}), "'graphs' must be a non-empty object"),
    (lambda m: m["graphs"]["g"].update(file=""), "graphs.g: 'file' must be a non-empty string"),
    (lambda m: m["graphs"]["g"].update(precision="bf16"), "graphs.g: unknown precision 'bf16'"),
    (lambda m: m["graphs"]["g"]["inputs"]["x"].update(shape=[-1, 8]), "graphs.g.inputs.x: dims must be non-negative"),
    (lambda m: m["graphs"]["g"].update(weights_id=""), "graphs.g: 'weights_id' must be a non-empty string"),
])
def test_malformed_manifest_names_file_and_field(tmp_path: Path, mutate, message: str) -> None:
    raw = {"format": 1, "graphs": {"g": _graph_json("g.onnx", "0" * 64)}}
    mutate(raw)
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match=message) as info:
        load_manifest(tmp_path)
    assert str(tmp_path / "manifest.json") in str(info.value)


def test_unreadable_or_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="no export manifest"):
        load_manifest(tmp_path)
    with pytest.raises(ManifestError, match=r"onnx_typo: no such export folder \(the --out of `megactor-rt export`\)"):
        load_manifest(tmp_path / "onnx_typo")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not a readable JSON manifest"):
        load_manifest(tmp_path)
    graph = tmp_path / "vae_decoder.fp16.0123456789ab.onnx"  # (--onnx naming a graph: build-engines, animate)
    graph.write_bytes(b"\x08\x09\xd8\xf3 protobuf")
    with pytest.raises(ManifestError, match=r"vae_decoder.fp16.0123456789ab.onnx: an export is named by its folder "
                                            r"\(the --out of `megactor-rt export`\) or its manifest.json, not this "
                                            "file"):
        load_manifest(graph)  # (was "not a readable JSON manifest: 'utf-8' codec can't decode byte ...")


def _graph(inputs: dict[str, tuple], profiles: dict[str, dict[str, tuple]]) -> GraphEntry:
    specs = {n: TensorSpec(n, "float16", s) for n, s in inputs.items()}
    profs = {p: {n: ProfileShapes(*map(tuple, t)) for n, t in v.items()} for p, v in profiles.items()}
    return GraphEntry("g", "g.onnx", "temporal_unet", "fp16", "0" * 64, specs,
                      {"out": TensorSpec("out", "float16", (1,))}, profs)


def test_check_profiles_cover_accepts_a_good_profile() -> None:
    g = _graph({"lat": (2, 9, "frames", 64, 64), "pose": ("frames", 4, 64, 64), "t": (1,)},
               {"w16": {"lat": ([2, 9, 1, 64, 64], [2, 9, 16, 64, 64], [2, 9, 24, 64, 64]),
                        "pose": ([1, 4, 64, 64], [16, 4, 64, 64], [24, 4, 64, 64])}})
    assert check_profiles_cover(g) == []


@pytest.mark.parametrize(("profile", "needle"), [
    ({"lat": ([2, 9, 1, 64, 64], [2, 9, 16, 64, 64], [2, 9, 24, 64, 64])}, "does not cover dynamic input 'pose'"),
    ({"lat": ([2, 9, 8, 64, 64], [2, 9, 4, 64, 64], [2, 9, 24, 64, 64]),
      "pose": ([8, 4, 64, 64], [4, 4, 64, 64], [24, 4, 64, 64])}, "min <= opt <= max"),
    ({"lat": ([2, 9, 1, 64, 64], [2, 9, 16, 64, 64], [2, 9, 24, 64, 32]),
      "pose": ([1, 4, 64, 64], [16, 4, 64, 64], [24, 4, 64, 64])}, "static axis 4 is 64"),
    ({"lat": ([2, 9, 1, 64], [2, 9, 16, 64], [2, 9, 24, 64]),
      "pose": ([1, 4, 64, 64], [16, 4, 64, 64], [24, 4, 64, 64])}, "rank"),
    ({"lat": ([2, 9, 1, 64, 64], [2, 9, 16, 64, 64], [2, 9, 24, 64, 64]),
      "pose": ([1, 4, 64, 64], [8, 4, 64, 64], [24, 4, 64, 64])}, "dim 'frames' is 1/8/24 here but 1/16/24"),
    ({"lat": ([2, 9, 1, 64, 64], [2, 9, 16, 64, 64], [2, 9, 24, 64, 64]),
      "pose": ([1, 4, 64, 64], [16, 4, 64, 64], [24, 4, 64, 64]), "bogus": ([1], [1], [1])}, "'bogus'"),
    ({"lat": ([2, 9, 1, 64, 64], [2, 9, 16, 64, 32], [2, 9, 24, 64, 64]),  # only opt off the static size
      "pose": ([1, 4, 64, 64], [16, 4, 64, 64], [24, 4, 64, 64])}, "static axis 4 is 64 but the profile gives 64/32/64"),
    ({"lat": ([2, 9, -1, 64, 64], [2, 9, 16, 64, 64], [2, 9, 24, 64, 64]),  # a negative minimum
      "pose": ([-1, 4, 64, 64], [16, 4, 64, 64], [24, 4, 64, 64])}, "needs 0 <= min <= opt <= max, got -1/16/24"),
])
def test_check_profiles_cover_finds_each_problem(profile: dict, needle: str) -> None:
    g = _graph({"lat": (2, 9, "frames", 64, 64), "pose": ("frames", 4, 64, 64)}, {"p": profile})
    problems = check_profiles_cover(g)
    assert any(needle in p for p in problems), problems


def test_dynamic_graph_without_profiles_is_a_problem(tmp_path: Path) -> None:
    assert "no profile" in check_profiles_cover(_graph({"x": ("b", 3)}, {}))[0]
    assert check_profiles_cover(_graph({"x": (2, 3)}, {})) == []  # fixed sizes: no profile needed
    raw = {"format": 1, "graphs": {"g": _graph_json("g.onnx", "0" * 64)}}
    raw["graphs"]["g"]["profiles"]["default"]["x"] = [[4, 8], [2, 8], [1, 8]]
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match="invalid shape profiles"):
        load_manifest(tmp_path)


# -- keys and sidecars -----------------------------------------------------------------------------------

def test_every_key_part_changes_the_key() -> None:
    shapes = {"x": [[1, 8], [2, 8], [4, 8]]}
    base = EngineKey(H100, "fp16", "a" * 64, "default", shapes)
    variants = [
        replace(base, device=replace(H100, gpu_name="NVIDIA A100-SXM4-80GB")),
        replace(base, device=replace(H100, compute_capability=(8, 9))),
        replace(base, device=replace(H100, trt_version="10.13.0.35")),
        replace(base, precision="fp32"),
        replace(base, onnx_sha256="b" * 64),
        replace(base, profile_name="w16"),
        replace(base, profile_shapes={"x": [[1, 8], [2, 8], [8, 8]]}),
    ]
    digests = {base.digest()} | {v.digest() for v in variants}
    dirnames = {base.dirname()} | {v.dirname() for v in variants}
    assert len(digests) == len(variants) + 1
    assert len(dirnames) == len(variants) + 1
    assert base.digest() == EngineKey(H100, "fp16", "a" * 64, "default", dict(shapes)).digest()
    assert base.dirname().startswith("nvidia-h100-80gb-hbm3_sm90_trt11.1.0.106_fp16_default_")


def test_the_plan_folders_are_named_as_the_readme_shows(tmp_path: Path) -> None:
    """engine/README.md's cache layout and its example are the folders plan_dir names (it showed
    ``<graph>/``, and the folder is the manifest's ``temporal-unet-cond.fp16``)."""
    key = EngineKey(H100, "fp16", "0" * 64, "default", {"x": [[1], [1], [1]]})
    got = plan_dir(tmp_path, "temporal_unet_cond.fp16", key).relative_to(tmp_path).as_posix()
    readme = (Path(__file__).parents[1] / "engine" / "README.md").read_text()
    assert "<engine dir>/<graph>.<precision>/<gpu>_sm<cc>_trt<version>_<precision>_<profile>_<digest16>/" in readme
    example = re.search(r"`(temporal-unet-cond\.fp16/\S+)_<digest16>/engine\.plan`", readme)
    assert example is not None and got == f"{example.group(1)}_{key.digest()[:16]}"


def test_sidecar_round_trip(onnx_dir: Path, tmp_path: Path) -> None:
    results, _ = _built(onnx_dir, tmp_path / "engines", profile="default")
    directory = results[0].directory
    record = read_sidecar(directory)
    assert EngineRecord.from_json(record.to_json()) == record
    assert record.device == H100 and record.submodel == "vae_decoder" and record.profile_name == "default"
    assert record.inputs == FAKE_IO["inputs"] and record.outputs == FAKE_IO["outputs"]
    assert record.plan_sha256 == hashlib.sha256((directory / PLAN_NAME).read_bytes()).hexdigest()
    assert record.key == record.engine_key().digest() and directory.name.endswith(record.key[:16])
    assert load_valid_record(directory, H100) == record


@pytest.mark.parametrize("other", [
    replace(H100, gpu_name="NVIDIA GeForce RTX 4090"),
    replace(H100, compute_capability=(8, 9)),
    replace(H100, trt_version="10.13.0.35"),
    replace(H100, trt_version=H100.trt_version + "+cu13"),  # the same release, its CUDA 13 build
])
def test_foreign_plan_raises_engine_mismatch_with_rebuild(onnx_dir: Path, tmp_path: Path, other: DeviceInfo) -> None:
    results, _ = _built(onnx_dir, tmp_path / "engines", profile="default")
    with pytest.raises(EngineMismatch, match="rebuild") as info:
        load_valid_record(results[0].directory, other)
    assert "H100" in str(info.value)
    runner = TensorRTRunner(results[0].directory, device=other)  # reads the sidecar only
    with pytest.raises(EngineMismatch, match="rebuild"):
        runner.activate()  # refused before TensorRT is imported
    assert not runner.is_active


def test_tensorrt_cuda_flavour_comes_from_the_wheels_names() -> None:
    """The cu12 and cu13 wheels of one TensorRT release share ``__version__``; their distribution names tell
    them apart, and DeviceInfo.current adds the flavour to the version a plan is tied to."""
    assert tensorrt_cuda_flavour(["numpy", "tensorrt", "tensorrt-cu12", "tensorrt_cu12_libs",
                                  "tensorrt-cu12-bindings"]) == "cu12"
    assert tensorrt_cuda_flavour(["TensorRT-CU13-Libs", "torch"]) == "cu13"
    assert tensorrt_cuda_flavour(["tensorrt", "tensorrt-llm", "tensorrt_cu"]) == ""  # nothing says
    assert tensorrt_cuda_flavour(["tensorrt-cu12", "tensorrt-cu13-libs"]) == "cu12+cu13"  # both: kept apart too
    import importlib.metadata

    here = [d.metadata["Name"] or "" for d in importlib.metadata.distributions()]  # this environment's wheels
    assert tensorrt_cuda_flavour() == tensorrt_cuda_flavour(here)


def test_the_device_version_names_the_tensorrt_wheels_cuda_flavour(monkeypatch: pytest.MonkeyPatch) -> None:
    """DeviceInfo.current ties plans to TensorRT's version and its wheels' CUDA flavour (cu12 and cu13 builds of
    one release share __version__; a plan of one would not deserialize under the other)."""
    import fake_tensorrt

    from megactor_rt.engine import cache as engine_cache

    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: "NVIDIA H100")
    monkeypatch.setattr(engine_cache, "tensorrt_cuda_flavour", lambda names=None: "cu13")
    device = DeviceInfo.current()
    assert device.trt_version == f"{fake_tensorrt.__version__}+cu13" and device.compute_capability == (9, 0)
    monkeypatch.setattr(engine_cache, "tensorrt_cuda_flavour", lambda names=None: "")  # a tarball install
    assert DeviceInfo.current().trt_version == str(fake_tensorrt.__version__)


def test_a_sidecar_edited_without_its_key_is_refused(onnx_dir: Path, tmp_path: Path) -> None:
    """A sidecar whose fields no longer give the key its folder is named by (edited, or copied from another
    plan) is not trusted."""
    directory = _built(onnx_dir, tmp_path / "engines")[0][0].directory
    raw = json.loads((directory / SIDECAR_NAME).read_text())
    raw["onnx_sha256"] = "0" * 64
    (directory / SIDECAR_NAME).write_text(json.dumps(raw))
    with pytest.raises(EngineMismatch, match="does not match its own fields"):
        load_valid_record(directory, H100)


def test_a_plan_of_other_profile_shapes_is_not_the_expected_one(onnx_dir: Path, tmp_path: Path) -> None:
    """After a re-export that changed only the profiles (same graph file), the plan built for the old ones is
    not taken for the new ones: build-engines rebuilds it and the runtime does not select it."""
    directory = _built(onnx_dir, tmp_path / "engines")[0][0].directory
    key = read_sidecar(directory).engine_key()
    assert load_valid_record(directory, H100, key)
    other = {name: [[*shape[:-1], shape[-1] + 1] for shape in limits] for name, limits in key.profile_shapes.items()}
    with pytest.raises(EngineMismatch, match="profile_shapes"):
        load_valid_record(directory, H100, replace(key, profile_shapes=other))


@pytest.mark.parametrize("damage", ["garbage", "missing_field", "unknown_field", "no_sidecar", "truncated",
                                    "flipped", "other_format", "bad_capability", "null_shapes", "builder_text",
                                    "null_inputs", "float_bytes", "shape_text"])
def test_corrupt_or_missing_sidecar_or_plan_raises_rebuild(onnx_dir: Path, tmp_path: Path, damage: str) -> None:
    results, _ = _built(onnx_dir, tmp_path / "engines", profile="default")
    d = results[0].directory
    side, plan = d / SIDECAR_NAME, d / PLAN_NAME
    raw = json.loads(side.read_text())
    if damage == "garbage":
        side.write_text("{\"format\": 1, oops")
    elif damage == "missing_field":
        del raw["plan_sha256"]
        side.write_text(json.dumps(raw))
    elif damage == "unknown_field":
        raw["surprise"] = 1
        side.write_text(json.dumps(raw))
    elif damage == "no_sidecar":
        side.unlink()
    elif damage == "other_format":  # a sidecar another version of the project wrote
        raw["format"] = 2
        side.write_text(json.dumps(raw))
    elif damage == "bad_capability":
        raw["compute_capability"] = [9, 0, 1]
        side.write_text(json.dumps(raw))
    elif damage in ("null_shapes", "builder_text", "null_inputs", "float_bytes", "shape_text"):  # (edited by
        # hand: were an AttributeError or TypeError, "unexpected error", or taken as a valid plan)
        field, value = {"null_shapes": ("profile_shapes", None), "builder_text": ("builder", "fast"),
                        "null_inputs": ("inputs", None), "float_bytes": ("plan_bytes", 1.5),
                        "shape_text": ("profile_shapes", {"x": "1x4x64x64"})}[damage]
        raw[field] = value
        side.write_text(json.dumps(raw))
    elif damage == "truncated":
        plan.write_bytes(plan.read_bytes()[:-3])
    else:
        data = bytearray(plan.read_bytes())
        data[0] ^= 0xFF
        plan.write_bytes(bytes(data))
    with pytest.raises(EngineMismatch, match="rebuild"):
        load_valid_record(d, H100)


def test_runner_without_sidecar_is_refused(tmp_path: Path) -> None:
    (tmp_path / PLAN_NAME).write_bytes(b"foreign plan")
    with pytest.raises(EngineMismatch, match="missing engine sidecar.*rebuild"):
        TensorRTRunner(tmp_path / PLAN_NAME, device=H100)
    with pytest.raises(InputError, match="plan folder .*nowhere does not exist"):
        TensorRTRunner(tmp_path / "nowhere", device=H100)  # was: "missing engine sidecar ... rebuild"


# -- build planning and skip logic -----------------------------------------------------------------------

def test_build_skips_valid_plans_and_rebuilds_invalid_ones(onnx_dir: Path, tmp_path: Path) -> None:
    engines = tmp_path / "engines"
    first, fake = _built(onnx_dir, engines)
    assert sorted(fake.calls) == ["vae_decoder_fp16[big]", "vae_decoder_fp16[default]"]
    assert {r.status for r in first} == {"built"}
    assert first[0].directory != first[1].directory  # one directory per profile

    again, fake2 = _built(onnx_dir, engines)
    assert fake2.calls == [] and {r.status for r in again} == {"skipped"}

    # other builder settings: the plans are rebuilt (same directories: one plan per graph, profile and key)
    tuned, fake_t = _built(onnx_dir, engines, optimization_level=5)
    assert len(fake_t.calls) == 2 and [r.directory for r in tuned] == [r.directory for r in first]
    assert load_valid_record(first[0].directory, H100).builder["optimization_level"] == 5
    back, fake_b = _built(onnx_dir, engines)
    assert len(fake_b.calls) == 2 and {r.status for r in back} == {"built"}

    # an fp16 plan whose sidecar predates the "tf32" setting was built with TF32 on, as now: reused
    sidecar = first[0].directory / SIDECAR_NAME
    old = json.loads(sidecar.read_text())
    del old["builder"]["tf32"]
    sidecar.write_text(json.dumps(old))
    older, fake_o = _built(onnx_dir, engines)
    assert fake_o.calls == [] and {r.status for r in older} == {"skipped"}

    forced, fake3 = _built(onnx_dir, engines, force=True)
    assert len(fake3.calls) == 2 and {r.status for r in forced} == {"built"}

    (first[0].directory / PLAN_NAME).write_bytes(b"broken")
    repaired, fake4 = _built(onnx_dir, engines)
    assert fake4.calls == [f"vae_decoder_fp16[{first[0].profile_name}]"]
    assert load_valid_record(first[0].directory, H100).plan_bytes > len(b"broken")

    elsewhere, fake5 = _built(onnx_dir, engines, device=replace(H100, trt_version="11.2.0.1"))
    assert len(fake5.calls) == 2  # another TensorRT version gets its own plans
    assert {r.directory for r in elsewhere}.isdisjoint({r.directory for r in first})


def test_build_refuses_onnx_that_does_not_match_the_manifest(onnx_dir: Path, tmp_path: Path) -> None:
    with open(onnx_dir / "vae_decoder.fp16.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(EngineMismatch, match="sha256"):
        _built(onnx_dir, tmp_path / "engines")


def test_plan_jobs_filters_by_precision_and_profile(onnx_dir: Path, tmp_path: Path) -> None:
    m = load_manifest(onnx_dir)
    jobs = plan_jobs(m, H100, tmp_path, BuildOptions(profile="big"))
    assert [(j.graph.name, j.profile_name) for j in jobs] == [("vae_decoder_fp16", "big")]
    assert jobs[0].profile["x"].max == (16, 8)
    assert jobs[0].key.profile_shapes == {"x": [[1, 8], [8, 8], [16, 8]]}
    with pytest.raises(InputError, match="no fp32 graphs"):
        plan_jobs(m, H100, tmp_path, BuildOptions(precision="fp32"))
    with pytest.raises(InputError, match="no graph has profile 'w16'"):
        plan_jobs(m, H100, tmp_path, BuildOptions(profile="w16"))
    with pytest.raises(InputError, match="unknown graphs"):
        plan_jobs(m, H100, tmp_path, BuildOptions(), graphs=["nope"])


def test_a_profile_with_the_shapes_of_another_is_built_once(onnx_dir: Path, tmp_path: Path) -> None:
    """An export at the longest window (``export --window 32``) has a ``long`` profile equal to its ``default``:
    one plan serves both (the second was an identical build of minutes per UNet graph); asked for by name, it is
    built."""
    path = onnx_dir / "manifest.json"
    raw = json.loads(path.read_text())
    profiles = raw["graphs"]["vae_decoder_fp16"]["profiles"]
    raw["graphs"]["vae_decoder_fp16"]["profiles"] = {"long": profiles["default"], **profiles}  # (default not first)
    path.write_text(json.dumps(raw))
    m = load_manifest(onnx_dir)
    assert [j.profile_name for j in plan_jobs(m, H100, tmp_path, BuildOptions())] == ["default", "big"]
    assert [j.profile_name for j in plan_jobs(m, H100, tmp_path, BuildOptions(profile="long"))] == ["long"]
    results, fake = _built(onnx_dir, tmp_path / "engines")
    assert fake.calls == ["vae_decoder_fp16[default]", "vae_decoder_fp16[big]"]
    assert [r.status for r in results] == ["built", "built"]


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"precision": "int8"}, "unknown precision"),
    ({"optimization_level": 6}, "0..5"),
    ({"workspace_gib": 0}, "workspace"),
    ({"profile": ""}, "profile"),
])
def test_build_options_are_validated(kwargs: dict, needle: str) -> None:
    with pytest.raises(InputError, match=needle):
        BuildOptions(**kwargs)
    assert BuildOptions().precision is Precision.FP16


def test_make_record_describes_the_plan(onnx_dir: Path, tmp_path: Path) -> None:
    job = plan_jobs(load_manifest(onnx_dir), H100, tmp_path, BuildOptions(profile="default"))[0]
    rec = make_record(job, b"abc", FAKE_IO, 12.5, BuildOptions(optimization_level=5, workspace_gib=8))
    assert rec.plan_bytes == 3 and rec.plan_sha256 == hashlib.sha256(b"abc").hexdigest()
    assert rec.builder == {"optimization_level": 5, "workspace_gib": 8, "strongly_typed": True, "tf32": True}
    assert BuildOptions(precision="fp32").builder_settings()["tf32"] is False
    assert rec.profile_shapes == {"x": [[1, 8], [2, 8], [4, 8]]}
    assert (rec.gpu_name, rec.compute_capability, rec.trt_version) == ("NVIDIA H100 80GB HBM3", [9, 0], "11.1.0.106")
    assert rec.onnx_sha256 == job.graph.sha256 and rec.build_seconds == 12.5 and rec.built_at


def test_build_engines_without_tensorrt_raises_backend_unavailable(onnx_dir: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail everywhere
    with pytest.raises(BackendUnavailable, match=r"pip install tensorrt cuda-python .*pip install -e '\.\[tensorrt\]'"):
        build_engines(onnx_dir, tmp_path / "engines")
    assert not (tmp_path / "engines").exists()


def test_build_engines_drives_the_tensorrt_build(onnx_dir: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeBuilder()
    monkeypatch.setattr(builder_mod, "import_tensorrt", lambda: object())
    monkeypatch.setattr(builder_mod.DeviceInfo, "current", classmethod(lambda cls, device=None: H100))
    monkeypatch.setattr(builder_mod, "_build_plan_trt", fake)
    results = build_engines(onnx_dir, tmp_path / "engines", "fp16", "default")
    assert [r.status for r in results] == ["built"] and fake.calls == ["vae_decoder_fp16[default]"]
    assert [r.status for r in build_engines(onnx_dir, tmp_path / "engines", profile="default")] == ["skipped"]


# -- backend selection -----------------------------------------------------------------------------------

def _trt_ok() -> tuple[bool, str]:
    return True, "tensorrt 11.1.0.106"


def test_select_uses_tensorrt_for_valid_plans_and_fallback_otherwise(onnx_dir: Path, tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    engines = tmp_path / "engines"
    _built(onnx_dir, engines, profile="default")
    caplog.set_level(logging.INFO, logger="megactor_rt.engine.select")
    got = select_backends(["vae_decoder", "temporal_unet"], engines, device=H100, tensorrt_status=_trt_ok,
                          manifest=load_manifest(onnx_dir))
    assert got["vae_decoder"].backend == "tensorrt" and got["vae_decoder"].plan_dir is not None
    assert got["temporal_unet"].backend == "onnxruntime" and "no TensorRT plan" in got["temporal_unet"].reason
    assert "vae_decoder: backend tensorrt" in caplog.text and "temporal_unet: backend onnxruntime" in caplog.text

    forced = select_backends(["vae_decoder"], engines, "reference_net, vae_decoder", fallback="torch",
                             device=H100, tensorrt_status=_trt_ok)
    assert forced["vae_decoder"].backend == "torch" and "forced" in forced["vae_decoder"].reason

    other_profile = select_backends(["vae_decoder"], engines, device=H100, tensorrt_status=_trt_ok, profile="big")
    assert other_profile["vae_decoder"].backend == "onnxruntime"


def test_select_offers_every_profile_and_each_call_runs_on_a_plan_that_takes_it(onnx_dir: Path,
                                                                                tmp_path: Path) -> None:
    """With plans for several profiles (``build-engines`` builds all), the choice lists them all, default
    first, and the runner sends each call to a plan whose profile holds its shapes, preferring one tuned
    for them; shapes no plan takes are an InputError naming each profile's ranges. (Plans are only
    deserialized on a call; choosing reads the sidecars.)"""
    from megactor_rt.engine.runner import ProfileSetRunner

    engines = tmp_path / "engines"
    _built(onnx_dir, engines)  # profiles default (x: 1..4, opt 2) and big (1..16, opt 8)
    choice = select_backends(["vae_decoder"], engines, device=H100, tensorrt_status=_trt_ok,
                             manifest=load_manifest(onnx_dir))["vae_decoder"]
    assert choice.backend == "tensorrt" and len(choice.plan_dirs) == 2 and choice.plan_dir == choice.plan_dirs[0]
    assert [read_sidecar(d).profile_name for d in choice.plan_dirs] == ["default", "big"]
    runner = ProfileSetRunner(choice.plan_dirs, device=H100)
    assert runner.input_names == ("x",) and runner.max_size("x", 0) == 16
    # limits for calls of given sizes: batch 5 only in "big"; no plan takes 9 features
    assert runner.runners[0].max_size("x", 0, {0: 5}) == 0 and runner.max_size("x", 1, {0: 5}) == 8
    assert runner.max_size("x", 0, {1: 8}) == 16 and runner.max_size("x", 0, {1: 9}) == 0
    picked = {b: runner.runner_for({"x": (b, 8)}).record.profile_name for b in (1, 2, 3, 4, 5, 8, 16)}
    assert picked == {1: "default", 2: "default", 3: "default", 4: "default", 5: "big", 8: "big", 16: "big"}
    with pytest.raises(InputError, match=r"no plan takes input shapes.*'default': x \[1, 8\]..\[4, 8\]"):
        runner.runner_for({"x": (17, 8)})
    # a plan tuned for the shapes is preferred only once loaded: a call that 'default' takes does not load
    # 'big' for being tuned for it (an export at K windows per call loaded both UNet plans)
    big = runner.runners[1]
    ranges = big.shape_range
    big.shape_range = lambda name: (ranges(name)[0], [3, 8], ranges(name)[2])  # type: ignore[method-assign]
    assert runner.runner_for({"x": (3, 8)}).record.profile_name == "default"
    big.is_active = True  # loaded (for a batch only it takes)
    assert runner.runner_for({"x": (3, 8)}).record.profile_name == "big"
    runner.runners[0].is_active = True
    assert [runner.runner_for({"x": (b, 8)}).record.profile_name for b in (2, 3)] == ["default", "big"]
    big.is_active = runner.runners[0].is_active = False
    with pytest.raises(InputError, match="not of one graph"):
        ProfileSetRunner([choice.plan_dir, _other_graph_plan(tmp_path)], device=H100)


def test_a_stream_beyond_max_contexts_takes_over_the_least_recently_used_context(onnx_dir: Path,
                                                                                 tmp_path: Path) -> None:
    """Every run's decode side stream is a new CUDA stream: a fifth stream on a runner of 4 contexts takes over
    the least recently used stream's context (its first call then waits for that context's last on the device)
    instead of being refused (was: InputError 'more than 4 CUDA streams used it' at the fifth run)."""
    from megactor_rt.engine.runner import TensorRTRunner

    engines = tmp_path / "engines"
    plan_dir = _built(onnx_dir, engines)[0][0].directory
    runner = TensorRTRunner(plan_dir, device=H100, max_contexts=2)
    made: list[object] = []
    runner._engine = SimpleNamespace(create_execution_context=lambda: made.append(object()) or made[-1])
    running = SimpleNamespace(query=lambda: False)  # a last call the device has not finished
    s = [SimpleNamespace(cuda_stream=h) for h in (11, 12, 13, 14)]
    a = runner._context_for(s[0])
    a.done = running
    b = runner._context_for(s[1])
    b.done = running
    assert a is not b and len(made) == 2
    assert runner._context_for(s[0]) is a  # stream 11 used again: stream 12's context is now the oldest
    c = runner._context_for(s[2])
    assert c is b and len(made) == 2 and list(runner._contexts) == [11, 13]
    assert runner._context_for(s[3]) is a and list(runner._contexts) == [13, 14]


def test_a_new_stream_takes_an_idle_context_before_making_one(onnx_dir: Path, tmp_path: Path) -> None:
    """Each context holds activation memory for its plan's whole profile, and every run's decode side stream is
    a new one: a new stream takes a context whose last call the device has finished (and no call holds)
    rather than making one more (was: the VAE decoder's runner made one per run, up to max_contexts)."""
    from megactor_rt.engine.runner import TensorRTRunner

    engines = tmp_path / "engines"
    runner = TensorRTRunner(_built(onnx_dir, engines)[0][0].directory, device=H100, max_contexts=4)
    made: list[object] = []
    runner._engine = SimpleNamespace(create_execution_context=lambda: made.append(object()) or made[-1])
    finished, running = SimpleNamespace(query=lambda: True), SimpleNamespace(query=lambda: False)
    s = [SimpleNamespace(cuda_stream=h) for h in (21, 22, 23, 24)]
    a = runner._context_for(s[0])
    a.done = finished
    assert runner._context_for(s[1]) is a and len(made) == 1 and list(runner._contexts) == [22]
    a.done = running  # still running: the next new stream gets a context of its own
    b = runner._context_for(s[2])
    assert b is not a and len(made) == 2
    b.done = finished
    with a.lock:  # finished on the device, but a call is binding or enqueuing on it now
        a.done = finished
        assert runner._context_for(s[3]) is b and len(made) == 2


class _IOMode(enum.Enum):  # TensorRT's TensorIOMode and TensorLocation, for _io_engine
    INPUT, OUTPUT = 0, 1


class _IOLocation(enum.Enum):
    DEVICE, HOST = 0, 1


_IO_TRT = SimpleNamespace(TensorIOMode=_IOMode, TensorLocation=_IOLocation)


def _io_engine(dtypes: dict[str, str], host: frozenset[str] | set[str] = frozenset()) -> SimpleNamespace:
    """A stand-in engine with input ``x`` and output ``y`` of these TensorRT dtype names (``_IO_TRT``'s enums),
    the tensors named in ``host`` kept in host memory."""
    io = {"x": _IOMode.INPUT, "y": _IOMode.OUTPUT}
    return SimpleNamespace(num_io_tensors=2, get_tensor_name=lambda i: list(io)[i], get_tensor_mode=io.get,
                           get_tensor_dtype=lambda n: SimpleNamespace(name=dtypes[n]),
                           get_tensor_location=lambda n: _IOLocation.HOST if n in host else _IOLocation.DEVICE)


def test_an_engine_with_host_located_io_is_refused(onnx_dir: Path, tmp_path: Path) -> None:
    """A plan whose inputs TensorRT keeps in host memory (shape tensors; none of the export's graphs has one)
    is refused when loaded, naming the tensor, instead of being handed a GPU address at the first call."""
    from megactor_rt.engine.runner import TensorRTRunner

    runner = TensorRTRunner(_built(onnx_dir, tmp_path / "engines")[0][0].directory, device=H100)
    runner._engine = _io_engine({"x": "HALF", "y": "HALF"})
    runner._check_io(_IO_TRT)  # every tensor on the device: accepted
    runner._engine = _io_engine({"x": "HALF", "y": "HALF"}, host={"x"})
    with pytest.raises(EngineMismatch, match=r"takes \['x'\] in host memory"):
        runner._check_io(_IO_TRT)


def test_two_builds_of_one_plan_at_once_build_it_once(onnx_dir: Path, tmp_path: Path) -> None:
    """Two build-engines runs at once on one engine dir: each plan is built by one of them, the other waits
    for it and skips it as valid (was: both built, and one's plan could end up beside the other's sidecar)."""
    import threading
    import time

    engines = tmp_path / "engines"
    options = BuildOptions()
    jobs = plan_jobs(load_manifest(onnx_dir), H100, engines, options)
    builds: list[str] = []

    def slow(job, opts, cache):  # long enough for the other run to reach the same plan meanwhile
        builds.append(job.graph.name + job.profile_name)
        time.sleep(0.3)
        return b"PLAN:" + job.key.digest().encode() + str(len(builds)).encode(), FAKE_IO

    results: list[list] = []
    runs = [threading.Thread(target=lambda: results.append(run_jobs(jobs, H100, engines, options, slow)))
            for _ in range(2)]
    for t in runs:
        t.start()
    for t in runs:
        t.join(60)
    assert len(results) == 2 and sorted(builds) == sorted(set(builds)) and len(builds) == len(jobs)
    for first, second in zip(*results, strict=True):
        assert {first.status, second.status} == {"built", "skipped"}
    for job in jobs:  # every plan matches its own sidecar
        load_valid_record(job.directory, H100)  # raises EngineMismatch for a plan of another build


def test_valid_plans_are_skipped_without_taking_their_lock(onnx_dir: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The build lock is taken only to build: plans already valid in a folder this user may not write (a shared
    engine cache) are skipped as before (was: PermissionError creating the lock file)."""
    engines = tmp_path / "engines"
    first, _ = _built(onnx_dir, engines)

    def no_lock(directory: Path):  # noqa: ANN202
        raise PermissionError(directory / ".build.lock")

    monkeypatch.setattr(builder_mod, "plan_lock", no_lock)
    again, fake = _built(onnx_dir, engines)
    assert fake.calls == [] and {r.status for r in again} == {"skipped"} and len(again) == len(first)


def test_the_plan_bytes_loaded_are_the_bytes_checked(onnx_dir: Path, tmp_path: Path) -> None:
    """The runner deserializes the bytes whose size and sha256 it checked (one read), so a plan damaged or
    replaced between a check and a second read is never loaded."""
    from megactor_rt.engine.cache import read_plan

    job_dir = _built(onnx_dir, tmp_path / "engines")[0][0].directory
    record = read_sidecar(job_dir)
    assert read_plan(job_dir, record) == (job_dir / PLAN_NAME).read_bytes()
    data = bytearray((job_dir / PLAN_NAME).read_bytes())
    data[-1] ^= 1
    (job_dir / PLAN_NAME).write_bytes(bytes(data))
    with pytest.raises(EngineMismatch, match="sha256"):
        read_plan(job_dir, record)
    assert read_plan(job_dir, record, verify_hash=False) == bytes(data)


def _other_graph_plan(tmp_path: Path) -> Path:
    """A plan directory (sidecar only) of a graph other than the fixture's."""
    d = tmp_path / "other-onnx"
    d.mkdir()
    sha = _write_onnx(d / "vae_encoder.fp16.onnx")
    graph = _graph_json("vae_encoder.fp16.onnx", sha, submodel="vae_encoder")
    (d / "manifest.json").write_text(json.dumps({"format": 1, "graphs": {"vae_encoder_fp16": graph}}))
    results, _ = _built(d, tmp_path / "other-engines", profile="default")
    return results[0].directory


def test_fp32_plans_built_with_tf32_are_rebuilt_and_not_selected(tmp_path: Path) -> None:
    """An fp32 plan from before TF32 was turned off (its sidecar lacks "tf32": built with it on) is rebuilt by
    build-engines and refused by the runtime's selection (fp32 plans are for exactness), with the reason."""
    d = tmp_path / "onnx"
    d.mkdir()
    sha = _write_onnx(d / "vae_decoder.fp32.onnx")
    graph = _graph_json("vae_decoder.fp32.onnx", sha, precision="fp32")
    (d / "manifest.json").write_text(json.dumps({"format": 1, "graphs": {"vae_decoder_fp32": graph}}))
    engines = tmp_path / "engines"
    first, _ = _built(d, engines, precision="fp32", profile="default")
    picked = select_backends(["vae_decoder"], engines, device=H100, tensorrt_status=_trt_ok, precision="fp32")
    assert picked["vae_decoder"].backend == "tensorrt"
    sidecar = first[0].directory / SIDECAR_NAME
    old = json.loads(sidecar.read_text())
    del old["builder"]["tf32"]
    sidecar.write_text(json.dumps(old))
    refused = select_backends(["vae_decoder"], engines, device=H100, tensorrt_status=_trt_ok, precision="fp32")
    assert refused["vae_decoder"].backend != "tensorrt" and "built with TF32" in refused["vae_decoder"].reason
    del old["builder"]  # from before any builder setting was recorded: TF32 on too
    sidecar.write_text(json.dumps(old))
    older = select_backends(["vae_decoder"], engines, device=H100, tensorrt_status=_trt_ok, precision="fp32")
    assert older["vae_decoder"].backend != "tensorrt" and "built with TF32" in older["vae_decoder"].reason
    again, fake = _built(d, engines, precision="fp32", profile="default")
    assert fake.calls == ["vae_decoder_fp32[default]"]


def test_select_falls_back_on_foreign_plans_and_missing_tensorrt(onnx_dir: Path, tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """A plan that exists but cannot be used falls back with a warning (the CLI shows warnings; was: info, so
    a run silently went several times slower); the other fallbacks are notes."""
    engines = tmp_path / "engines"
    _built(onnx_dir, engines, profile="default")
    a100 = DeviceInfo("NVIDIA A100-SXM4-80GB", (8, 0), "11.1.0.106")
    with caplog.at_level(logging.INFO, logger="megactor_rt.engine.select"):
        foreign = select_backends(["vae_decoder"], engines, device=a100, tensorrt_status=_trt_ok)["vae_decoder"]
    assert foreign.backend == "onnxruntime" and "rebuild" in foreign.reason and "H100" in foreign.reason
    assert [r.levelno for r in caplog.records] == [logging.WARNING]

    no_trt = select_backends(["vae_decoder"], engines, fallback={"vae_decoder": "torch"},
                             tensorrt_status=lambda: (False, "python module 'tensorrt' is not installed"))
    assert no_trt["vae_decoder"].backend == "torch" and "not installed" in no_trt["vae_decoder"].reason

    no_dir = select_backends(["vae_decoder"], tmp_path / "nowhere", device=H100, tensorrt_status=_trt_ok)
    assert no_dir["vae_decoder"].backend == "onnxruntime" and "no engine directory" in no_dir["vae_decoder"].reason


def test_select_ignores_plans_of_another_export(onnx_dir: Path, tmp_path: Path) -> None:
    engines = tmp_path / "engines"
    _built(onnx_dir, engines, profile="default")
    m = load_manifest(onnx_dir)
    g = m.graphs["vae_decoder_fp16"]
    newer = replace(m, graphs={g.name: replace(g, sha256="f" * 64)})
    got = select_backends(["vae_decoder"], engines, device=H100, tensorrt_status=_trt_ok, manifest=newer)
    assert got["vae_decoder"].backend == "onnxruntime" and "another export" in got["vae_decoder"].reason


def test_fallback_list_parsing_rejects_unknown_names() -> None:
    assert parse_submodel_list("reference_net, vae_decoder,") == ["reference_net", "vae_decoder"]
    assert parse_submodel_list(None) == []
    with pytest.raises(InputError, match="unknown submodels \\['vae'\\]"):
        parse_submodel_list("reference_net,vae")


def test_write_plan_leaves_no_sidecar_when_plan_write_fails(tmp_path: Path, onnx_dir: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    results, _ = _built(onnx_dir, tmp_path / "engines", profile="default")
    d = results[0].directory
    record = read_sidecar(d)

    def boom(path: Path, data: bytes) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("megactor_rt.engine.cache.write_atomic", boom)
    with pytest.raises(OSError, match="disk full"):
        write_plan(d, b"new plan", record)
    assert not (d / SIDECAR_NAME).exists()  # the old sidecar no longer vouches for a half-written plan


def test_runner_checks_inputs_against_the_profile_before_running(onnx_dir: Path, tmp_path: Path) -> None:
    results, _ = _built(onnx_dir, tmp_path / "engines", profile="default")
    runner = TensorRTRunner(results[0].directory, device=H100)
    assert runner.input_names == ("x",) and runner.output_names == ("y",)
    import torch

    with pytest.raises(InputError, match=r"shape \[5, 8\]; profile 'default' allows \[1, 8\] .. \[4, 8\]"):
        runner._check_shape("x", (5, 8))
    with pytest.raises(InputError, match="the engine takes torch.float16"):
        runner._prepare_input("x", torch.zeros(2, 8, dtype=torch.int64))
    runner._check_shape("x", (3, 8))  # inside the profile: no error
    assert runner.max_size("x", 0) == 4 and runner.max_size("x", 1) == 8  # profile max; a static dim's size
    big, _ = _built(onnx_dir, tmp_path / "engines-big", profile="big")
    assert TensorRTRunner(big[0].directory, device=H100).max_size("x", 0) == 16


def test_engine_precision_is_the_config_enum_without_bf16() -> None:
    from megactor_rt.config import Precision as ConfigPrecision
    from megactor_rt.engine.manifest import parse_precision

    assert Precision is ConfigPrecision and parse_precision("fp32") is ConfigPrecision.FP32
    with pytest.raises(InputError, match=r"unknown precision 'bf16'; expected one of \['fp16', 'fp32'\]"):
        parse_precision(ConfigPrecision.BF16)


def test_atomic_write_removes_stale_temporaries(tmp_path: Path) -> None:
    """write_atomic's temporary files of the same target left by a killed build go once over an hour old."""
    import os

    from megactor_rt.engine.cache import write_atomic
    from megactor_rt.files import STALE_S

    stale, young = tmp_path / ".plan.engine.k1l2m3.tmp", tmp_path / ".plan.engine.n4o5p6.tmp"
    other = tmp_path / ".sidecar.json.q7r8s9.tmp"
    for p in (stale, young, other):
        p.write_bytes(b"half a plan")
    old = stale.stat().st_mtime - STALE_S - 60
    os.utime(stale, (old, old))
    os.utime(other, (old, old))
    write_atomic(tmp_path / "plan.engine", b"plan")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["plan.engine", young.name, other.name])
    assert (tmp_path / "plan.engine").read_bytes() == b"plan"


def test_a_staging_folder_with_recent_contents_is_kept(tmp_path: Path) -> None:
    """``remove_stale(folders=True)`` removes a folder only when nothing in it changed for the age either: a
    running export writing into an old folder (its own mtime changes only when entries are added or removed,
    not when a file in it grows) keeps its folder; once everything is old the folder goes. (Mutation audit.)"""
    import os
    import time

    from megactor_rt.files import STALE_S, remove_stale

    busy, dead = tmp_path / ".staging-busy", tmp_path / ".staging-dead"
    for folder in (busy, dead):
        (folder / "sub").mkdir(parents=True)
        (folder / "sub" / "fp32.onnx").write_bytes(b"partial")
    old = time.time() - STALE_S - 60
    for path in (busy / "sub", busy, dead / "sub" / "fp32.onnx", dead / "sub", dead):  # busy's file is recent
        os.utime(path, (old, old))
    assert remove_stale(tmp_path, ".staging-*", folders=True) == [dead]
    assert (busy / "sub" / "fp32.onnx").is_file() and not dead.exists()


def test_umask_modes_are_what_a_plain_write_gets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``umask_mode`` / ``folder_mode`` are the bits a plain ``open()`` / ``mkdir()`` gives under the process's
    umask (here 027: no bits for others), not 0666 / 0777 whatever the umask. (Mutation audit.)"""
    import os

    from megactor_rt import files

    monkeypatch.setattr(files, "_UMASK", 0o027)
    was = os.umask(0o027)
    try:
        (tmp_path / "plain").write_bytes(b"")
        (tmp_path / "folder").mkdir()
    finally:
        os.umask(was)
    assert files.umask_mode() == (tmp_path / "plain").stat().st_mode & 0o777 == 0o640
    assert files.folder_mode() == (tmp_path / "folder").stat().st_mode & 0o777 == 0o750


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The new content arrives by a rename (a new inode: a reader holding the old file keeps reading the old
    bytes); a failure before the rename (a full disk at fsync) keeps the old file and leaves no temporary."""
    import os

    from megactor_rt.engine import cache as cache_mod

    target = tmp_path / "engine.json"
    target.write_bytes(b"old")
    inode = target.stat().st_ino
    with open(target, "rb") as reader:
        cache_mod.write_atomic(target, b"new")
        assert reader.read() == b"old"  # replaced by a rename, not rewritten in place
    assert target.read_bytes() == b"new" and target.stat().st_ino != inode

    def full_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        cache_mod.write_atomic(target, b"newer")
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["engine.json"]


# -- the TensorRT build code against a stand-in module (tests/fake_tensorrt.py) ----------------------------

def _job(onnx_dir: Path, tmp_path: Path):
    return plan_jobs(load_manifest(onnx_dir), H100, tmp_path / "engines", BuildOptions(profile="default"))[0]


def test_tensorrt_build_code_drives_the_api(fake_trt, onnx_dir: Path, tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    """build_engines through _build_plan_trt: strongly typed network, the profile's min/opt/max, workspace
    limit, progress monitor, I/O read back from the network into the sidecar, timing cache kept and reused."""
    engines = tmp_path / "engines"
    with caplog.at_level(logging.INFO, logger="megactor_rt.engine.builder"):
        results = build_engines(onnx_dir, engines, "fp16", "default", workspace_gib=1.5)
    assert [r.status for r in results] == ["built"]
    assert "vae_decoder_fp16[default]: Building engine (1 steps)" in caplog.text  # the progress monitor ran
    record = read_sidecar(results[0].directory)
    assert record.inputs == {"x": {"dtype": "float16", "shape": [-1, 8]}}
    assert record.outputs == {"y": {"dtype": "float16", "shape": [-1, 4]}}
    plan = json.loads((results[0].directory / PLAN_NAME).read_bytes())
    assert plan == {"inputs": ["x"], "level": 3, "verbosity": "DETAILED", "workspace": int(1.5 * (1 << 30)),
                    "tf32": True, "profiles": [{"x": [[1, 8], [2, 8], [4, 8]]}]}
    cache = builder_mod.timing_cache_path(engines, H100)
    assert cache.read_bytes().endswith(b'{"builds": 1}')
    build_engines(onnx_dir, engines, "fp16", "default", force=True)
    assert cache.read_bytes().endswith(b'{"builds": 2}')  # read back and extended


def test_fp32_plans_are_built_without_tf32(fake_trt, onnx_dir: Path, tmp_path: Path) -> None:
    """TensorRT computes fp32 matmuls and convolutions in TF32 unless told not to; an fp32 plan is built without."""
    job = _job(onnx_dir, tmp_path)
    fp32 = replace(job, graph=replace(job.graph, precision="fp32"))
    built = {j.graph.precision: json.loads(bytes(builder_mod._build_plan_trt(j, BuildOptions(profile="default"),
                                                                            None)[0]))["tf32"]
             for j in (job, fp32)}
    assert built == {"fp16": True, "fp32": False}


def test_the_stand_in_refuses_builds_the_real_tensorrt_refuses(fake_trt, onnx_dir: Path, tmp_path: Path) -> None:
    """tests/fake_tensorrt.py fails a build as TensorRT does (None, an error logged) for a dynamic input without
    an optimization profile or a profile at odds with the network (rank, static sizes), so a builder that added
    no profile or a wrong one cannot pass the CPU tests."""
    job = _job(onnx_dir, tmp_path)
    for profiles, problem in (({}, "no optimization profile"), ({"x": [(1, 4), (2, 4), (4, 4)]}, "do not match"),
                              ({"x": [(1, 8, 1), (2, 8, 1), (4, 8, 1)]}, "do not match")):
        trt_logger = fake_trt.Logger()
        network = fake_trt.Builder(trt_logger).create_network(1 << int(fake_trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        assert fake_trt.OnnxParser(network, trt_logger).parse_from_file(str(job.graph.path))
        config = fake_trt.Builder(trt_logger).create_builder_config()
        for name, shapes in profiles.items():
            p = fake_trt.Builder(trt_logger).create_optimization_profile()
            p.set_shape(name, *shapes)
            config.add_optimization_profile(p)
        assert fake_trt.Builder(trt_logger).build_serialized_network(network, config) is None
        assert problem in trt_logger.messages[-1][1]


def test_unreadable_timing_cache_is_replaced_not_fatal(fake_trt, onnx_dir: Path, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    engines = tmp_path / "engines"
    cache = builder_mod.timing_cache_path(engines, H100)
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"garbage from a crashed or foreign build")
    with caplog.at_level(logging.WARNING, logger="megactor_rt.engine.builder"):
        assert [r.status for r in build_engines(onnx_dir, engines, "fp16", "default")] == ["built"]
    assert "does not match this GPU/TensorRT; starting a new one" in caplog.text
    assert cache.read_bytes().endswith(b'{"builds": 1}')


def test_the_timing_cache_keeps_what_other_builds_wrote_meanwhile(fake_trt, tmp_path: Path) -> None:
    """Another build-engines writing the timing cache while this build ran: its timings are combined with this
    build's, not replaced by them."""
    path = tmp_path / "timing" / "cache.bin"
    config = fake_trt.Builder(fake_trt.Logger()).create_builder_config()
    config.set_timing_cache(config.create_timing_cache(b""), False)
    config.get_timing_cache().entries["mine"] = 1
    path.parent.mkdir()
    path.write_bytes(fake_trt._TimingCache({"theirs": 2}).serialize())  # written meanwhile by another build
    builder_mod._save_timing_cache(config, path)
    assert config.create_timing_cache(path.read_bytes()).entries == {"mine": 1, "theirs": 2}


@pytest.mark.parametrize("damage", ["bad_shapes", "unparseable", "build_fails", "unknown_input"])
def test_tensorrt_build_failures_are_engine_build_errors(fake_trt, onnx_dir: Path, tmp_path: Path,
                                                         damage: str) -> None:
    job = _job(onnx_dir, tmp_path)
    needle = {"bad_shapes": "input x min/opt/max (4, 8)/(2, 8)/(1, 8) rejected by TensorRT",
              "unparseable": "could not parse", "build_fails": "failed to build",
              "unknown_input": "profile 'default' names ['bogus'], not inputs of"}[damage]
    if damage == "unknown_input":  # a profile of another graph's inputs: refused, not silently dropped
        job = replace(job, profile={**job.profile, "bogus": ProfileShapes((1,), (1,), (1,))})
    elif damage == "bad_shapes":
        job = replace(job, profile={"x": ProfileShapes((4, 8), (2, 8), (1, 8))})
    elif damage == "unparseable":
        (tmp_path / "broken.onnx").write_bytes(b"not a protobuf")
        job = replace(job, graph=replace(job.graph, root=tmp_path, file="broken.onnx"))
    else:
        fake_trt.Builder.fail_builds = True
    with pytest.raises(builder_mod.EngineBuildError, match=re.escape(needle)):
        builder_mod._build_plan_trt(job, BuildOptions(profile="default"), None)


def test_network_io_the_runner_cannot_bind_is_refused_before_the_build(tmp_path: Path) -> None:
    """TensorRT 11 has I/O types the runner has no torch tensor type for (FP8, INT4, FP4, E8M0): such a network
    is refused with the tensor named, right after parsing (was: "fp8" written into the sidecar after a build of
    minutes, then a misleading "engine I/O differs" when loading it)."""
    def tensor(name: str, dtype: str) -> SimpleNamespace:
        return SimpleNamespace(name=name, dtype=SimpleNamespace(name=dtype), shape=(-1, 8))

    def network(out_dtype: str) -> SimpleNamespace:
        ins, outs = [tensor("x", "HALF")], [tensor("y", out_dtype)]
        return SimpleNamespace(num_inputs=1, num_outputs=1, get_input=ins.__getitem__, get_output=outs.__getitem__)

    src = tmp_path / "g.onnx"
    assert builder_mod._network_io(network("HALF"), src) == {"inputs": {"x": {"dtype": "float16", "shape": [-1, 8]}},
                                                             "outputs": {"y": {"dtype": "float16", "shape": [-1, 8]}}}
    with pytest.raises(builder_mod.EngineBuildError, match=r"g\.onnx: network tensor 'y' is FP8"):
        builder_mod._network_io(network("FP8"), src)


def test_one_tensorrt_logger_per_process(fake_trt) -> None:
    """TensorRT keeps the first logger it is given: builders and runtimes share one, whose level a build sets."""
    from megactor_rt.engine.cache import trt_logger

    log = trt_logger(fake_trt)
    assert trt_logger(fake_trt, verbose=True) is log and log.min_severity == fake_trt.Logger.VERBOSE
    assert trt_logger(fake_trt) is log and log.min_severity == fake_trt.Logger.VERBOSE  # a runner leaves it
    trt_logger(fake_trt, verbose=False)
    assert log.min_severity == fake_trt.Logger.WARNING


def test_unaligned_views_are_copied_for_tensorrt() -> None:
    """TensorRT refuses tensor addresses not aligned to 256 bytes; a contiguous view at such an offset is
    copied, an aligned tensor is passed as it is."""
    from megactor_rt.engine.runner import ADDRESS_ALIGNMENT, aligned_for_tensorrt

    base = torch.arange(1024, dtype=torch.float32)
    k = (-base.data_ptr() % ADDRESS_ALIGNMENT) // 4  # the first element at an aligned address
    aligned = base[k:k + 16]
    assert aligned.data_ptr() % ADDRESS_ALIGNMENT == 0 and aligned_for_tensorrt(aligned) is aligned
    unaligned = base[k + 1:k + 17]
    fixed = aligned_for_tensorrt(unaligned)
    assert fixed.data_ptr() != unaligned.data_ptr() and torch.equal(fixed, unaligned)
    strided = base[k:k + 32:2]
    assert torch.equal(aligned_for_tensorrt(strided), strided) and aligned_for_tensorrt(strided).is_contiguous()


def test_windows_per_call_follow_the_plans_that_take_the_window_length() -> None:
    """A TensorRT UNet with a ``default`` plan (up to 3 windows of the export's 16 frames) and a ``long`` plan
    (one window of up to 32): runs with 16-frame windows get 3 windows per call, runs with 24-frame windows one
    (before, 3, which no plan took: the run failed at its first UNet call); a window length no plan takes
    leaves 1 (the call then names the profiles)."""
    from megactor_rt.config import AnimateConfig, tiny_config
    from megactor_rt.runner import Runner
    from megactor_rt.runtime.animator import Animator
    from megactor_rt.runtime.onnx_backend import GraphSubmodels

    class Plans(Runner):  # the UNet's plans as (windows max, frames min, frames max)
        def __init__(self, *plans: tuple[int, int, int]) -> None:
            super().__init__("temporal_unet_cond", ("latents",), ("eps",))
            self.plans = plans

        def infer_impl(self, feed):  # type: ignore[no-untyped-def]
            raise AssertionError("not called")

        def max_size(self, name, axis, where=None):  # type: ignore[no-untyped-def]
            frames = (where or {}).get(2)
            return max((k for k, lo, hi in self.plans if frames is None or lo <= frames <= hi), default=0)

    sub = GraphSubmodels("tensorrt", tiny_config(), "w", {"temporal_unet_cond": Plans((3, 1, 16), (1, 16, 32))},
                         torch.device("cpu"), torch.float32)
    assert sub.max_window_batch == 3
    assert [sub.window_batch_limit(f) for f in (8, 16, 24, 32, 40)] == [3, 3, 1, 1, 1]
    anim = Animator(sub, AnimateConfig(window=24, overlap=8, window_batch=3))
    assert anim.window_batch(anim.config) == 1
    assert anim.window_batch(AnimateConfig(window=16, overlap=8, window_batch=3)) == 3
    # refused before denoising (was: at the first UNet call, after the portrait and the driver's faces)
    sub.check_window(32)
    with pytest.raises(InputError, match="no plan of temporal_unet_cond takes windows of 40 frames; build the `long`"):
        sub.check_window(40)
    # what the export lacks, and reference mode, are refused before any work
    with pytest.raises(InputError, match="reference mode .* runs on the torch backend only, not tensorrt"):
        anim.check_run(AnimateConfig(mode="reference", guidance=1.0))
    with pytest.raises(InputError, match="the export has no .*temporal_unet_cond_reuse graph, which this run needs"):
        anim.check_run(AnimateConfig(guidance=1.0, feature_reuse=2))


# ---------------------------------------------------------------------------------------------- engine selection (mutation audit)


def test_a_plan_of_another_precision_is_never_chosen(tmp_path: Path) -> None:
    """Without the export's manifest (selection by sidecars alone) an fp32 plan is not taken for an fp16 run
    (or the reverse): the run would get the other precision's outputs and speed."""
    from megactor_rt.engine.select import select_backends

    d = tmp_path / "onnx"
    d.mkdir()
    sha = _write_onnx(d / "vae_decoder.fp32.onnx")
    (d / "manifest.json").write_text(json.dumps(
        {"format": 1, "graphs": {"vae_decoder_fp32": _graph_json("vae_decoder.fp32.onnx", sha, precision="fp32")}}))
    _built(d, tmp_path / "engines", precision="fp32", profile="default")
    fp32 = select_backends(["vae_decoder"], tmp_path / "engines", device=H100, tensorrt_status=_trt_ok,
                           precision="fp32")["vae_decoder"]
    fp16 = select_backends(["vae_decoder"], tmp_path / "engines", device=H100, tensorrt_status=_trt_ok,
                           precision="fp16")["vae_decoder"]
    assert fp32.backend == "tensorrt" and fp16.backend == "onnxruntime" and "no TensorRT plan" in fp16.reason


def test_build_engines_builds_only_the_graphs_asked_for(tmp_path: Path) -> None:
    """``build-engines --graphs vae_decoder`` builds that graph's plans only (a full-size UNet plan takes
    many minutes to build)."""
    from megactor_rt.engine.builder import BuildOptions, plan_jobs
    from megactor_rt.engine.manifest import load_manifest

    d = _two_graph_export(tmp_path)
    jobs = plan_jobs(load_manifest(d), H100, tmp_path / "engines", BuildOptions(profile="default"),
                     graphs=["vae_encoder_fp16"])
    assert [(j.graph.name, j.profile_name) for j in jobs] == [("vae_encoder_fp16", "default")]


def test_a_runner_checks_the_feed_before_activating_and_activates_once() -> None:
    """``Runner.infer`` names missing and unknown inputs before any work (a graph backend would otherwise fail
    inside onnxruntime/TensorRT with its own message, or silently ignore an extra input), activates an inactive
    runner at its first call, and only then. (Mutation audit.)"""
    from megactor_rt.runner import Runner

    class Echo(Runner):
        activations = 0

        def activate_impl(self) -> None:
            self.activations += 1

        def infer_impl(self, feed):  # noqa: ANN001, ANN202
            return {"y": feed["x"] + 1}

    runner = Echo("g", ["x"], ["y"])
    with pytest.raises(InputError, match=r"runner 'g': missing inputs \[\], unexpected inputs \['z'\]"):
        runner.infer({"x": torch.zeros(1), "z": torch.zeros(1)})
    with pytest.raises(InputError, match=r"missing inputs \['x'\], unexpected inputs \[\]"):
        runner.infer({})
    assert not runner.is_active and runner.calls == 0
    assert runner.infer({"x": torch.ones(1)})["y"].item() == 2 and runner.is_active
    runner.infer({"x": torch.ones(1)})
    assert runner.activations == 1 and runner.calls == 2


def test_nearest_folder_is_the_path_itself_where_it_exists(tmp_path: Path) -> None:
    """Where writing a path starts: the path itself when it exists (an existing output folder is what must be
    writable, not its parent), else its nearest existing ancestor. (Mutation audit.)"""
    from megactor_rt.files import nearest_folder

    (tmp_path / "out").mkdir()
    assert nearest_folder(tmp_path / "out") == tmp_path / "out"
    assert nearest_folder(tmp_path / "out" / "a" / "b.mp4") == tmp_path / "out"


def test_an_unavailable_backend_is_refused_with_its_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    """``require_backend`` raises BackendUnavailable with the backend's own reason when its check fails, and
    names the known backends for an unknown name (``exported_submodels`` relies on it to refuse before any
    export). (Mutation audit.)"""
    from megactor_rt.runtime import backends

    backends.backend_names()  # the built-in ones registered
    monkeypatch.setattr(backends, "_REGISTRY", dict(backends._REGISTRY))
    backends.register_backend("nothing", lambda: (False, "its library is missing"), "a stand-in")
    with pytest.raises(BackendUnavailable, match="backend 'nothing' is unavailable: its library is missing"):
        backends.require_backend("nothing")
    with pytest.raises(BackendUnavailable, match=r"unknown backend 'nope'; known: \['nothing', 'onnxruntime'"):
        backends.require_backend("nope")
    assert backends.require_backend("torch").name == "torch"


def test_tensorrt_without_a_visible_cuda_device_is_unavailable(fake_trt, monkeypatch: pytest.MonkeyPatch) -> None:
    """An installed TensorRT is available only with a CUDA device (its plans run nowhere else): doctor and
    require_backend say which of the two is missing. (Mutation audit.)"""
    from megactor_rt.runtime.backends import _trt_check

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _trt_check() == (False, f"tensorrt {fake_trt.__version__} is installed but no CUDA device is visible")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _trt_check() == (True, f"tensorrt {fake_trt.__version__}")


# ---------------------------------------------------------------------------------------------- engine package (mutation audit, second round)


def _write_static_onnx(path: Path) -> str:
    """A graph whose input has fixed sizes (no dynamic dim: no shape profile needed)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2, 4])
    w = helper.make_tensor("w", TensorProto.FLOAT16, [8, 4], [0.5] * 32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "static", [x], [y], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_optimization_level_tensorrt_has_is_accepted() -> None:
    """TensorRT's builder optimization levels are 0..5, both ends included (0: fastest build)."""
    assert [BuildOptions(optimization_level=n).optimization_level for n in (0, 5)] == [0, 5]
    for bad in (-1, 6, 2.0):
        with pytest.raises(InputError, match="0..5"):
            BuildOptions(optimization_level=bad)  # type: ignore[arg-type]


def test_a_static_graph_gets_the_static_profile_and_a_dynamic_one_needs_a_profile() -> None:
    """A graph without dynamic inputs and without profiles is built once, as profile 'static' (asked for by that
    name, or by no name); one with any dynamic input and no profile is refused, even beside static inputs."""
    from megactor_rt.engine.builder import graph_profiles

    static = _graph({"x": (2, 8), "t": (1,)}, {})
    assert graph_profiles(static) == {"static": {}} and graph_profiles(static, "static") == {"static": {}}
    with pytest.raises(InputError, match="static and has no profile 'default'"):
        graph_profiles(static, "default")
    with pytest.raises(InputError, match="has dynamic inputs but no shape profile"):
        graph_profiles(_graph({"x": ("b", 8), "t": (1,)}, {}))


def test_a_static_graph_builds_without_an_optimization_profile(fake_trt, tmp_path: Path) -> None:
    """build-engines --profile static on an export whose graph takes fixed sizes: one plan, built with no
    optimization profile (TensorRT refuses an empty one), and with --no-timing-cache no timing cache is
    written."""
    d = tmp_path / "onnx"
    d.mkdir()
    sha = _write_static_onnx(d / "pose_guider_film.fp16.onnx")
    entry = {"file": "pose_guider_film.fp16.onnx", "submodel": "pose_guider_film", "precision": "fp16", "sha256": sha,
             "inputs": {"x": {"dtype": "float16", "shape": [2, 8]}},
             "outputs": {"y": {"dtype": "float16", "shape": [2, 4]}}}
    (d / "manifest.json").write_text(json.dumps({"format": 1, "graphs": {"film": entry}}))
    engines = tmp_path / "engines"
    results = build_engines(d, engines, "fp16", "static", timing_cache=False)
    assert [(r.graph, r.profile_name, r.status) for r in results] == [("film", "static", "built")]
    plan = json.loads((results[0].directory / PLAN_NAME).read_bytes())
    assert plan["profiles"] == [] and plan["inputs"] == ["x"]
    assert not (engines / "timing_cache").exists()
    assert read_sidecar(results[0].directory).inputs == {"x": {"dtype": "float16", "shape": [2, 8]}}


def test_a_build_result_says_why_the_plan_was_built(onnx_dir: Path, tmp_path: Path) -> None:
    """build-engines prints each result: a plan built because none was valid says so, a forced rebuild says
    'forced', a reused one says when it was built."""
    engines = tmp_path / "engines"
    first, _ = _built(onnx_dir, engines, profile="default")
    again, _ = _built(onnx_dir, engines, profile="default")
    forced, _ = _built(onnx_dir, engines, profile="default", force=True)
    assert [r.reason for r in first] == ["no valid plan"] and [r.reason for r in forced] == ["forced"]
    assert again[0].reason.startswith("valid plan built ")


def test_a_plan_folder_without_its_sidecar_is_named_when_selecting(onnx_dir: Path, tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """A plan whose sidecar is missing (a build killed between the two writes, a plan copied without it) is a
    plan that cannot be used: the fallback's reason names it, as a warning (not 'no plan, build one')."""
    plan = tmp_path / "engines" / "vae_decoder_fp16" / "somekey" / PLAN_NAME
    plan.parent.mkdir(parents=True)
    plan.write_bytes(b"a plan")
    with caplog.at_level(logging.INFO, logger="megactor_rt.engine.select"):
        got = select_backends(["vae_decoder"], tmp_path / "engines", device=H100, tensorrt_status=_trt_ok)
    assert got["vae_decoder"].backend == "onnxruntime"
    assert got["vae_decoder"].reason.startswith("no usable TensorRT plan: ") and "missing engine sidecar" in \
        got["vae_decoder"].reason
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    others = select_backends(["pose_guider", "vae_encoder"], tmp_path / "engines", device=H100,
                             tensorrt_status=_trt_ok)  # (the folder is the decoder's: was blamed on every graph)
    assert [c.reason.split(" (")[0] for c in others.values()] == ["no TensorRT plan for pose_guider",
                                                                  "no TensorRT plan for vae_encoder"]


def test_the_graph_hash_covers_its_external_data(tmp_path: Path) -> None:
    """A graph over 2 GB keeps its weights in ``<file>.data``: a re-export that changed only those weights gets
    another sha256 (so another engine key, and build-engines refuses a mismatched pair)."""
    from megactor_rt.engine.cache import external_data_path, sha256_graph

    path = tmp_path / "g.onnx"
    _write_onnx(path)
    alone = sha256_graph(path)
    assert alone == hashlib.sha256(path.read_bytes()).hexdigest()
    external_data_path(path).write_bytes(b"weights v1")
    v1 = sha256_graph(path)
    external_data_path(path).write_bytes(b"weights v2")
    assert len({alone, v1, sha256_graph(path)}) == 3


def test_one_plan_per_profile_is_offered(onnx_dir: Path, tmp_path: Path) -> None:
    """Plans of two exports of one graph (selection without the manifest: both valid for this machine) with the
    same profile: the choice offers one of them, not both (one plan per profile)."""
    engines = tmp_path / "engines"
    first = _built(onnx_dir, engines, profile="default")[0][0].directory
    d2 = tmp_path / "onnx2"
    d2.mkdir()
    model = onnx.load(str(onnx_dir / "vae_decoder.fp16.onnx"))
    model.doc_string = "another export"
    onnx.save(model, str(d2 / "vae_decoder.fp16.onnx"))
    sha = hashlib.sha256((d2 / "vae_decoder.fp16.onnx").read_bytes()).hexdigest()
    (d2 / "manifest.json").write_text(json.dumps(
        {"format": 1, "graphs": {"vae_decoder_fp16": _graph_json("vae_decoder.fp16.onnx", sha)}}))
    second = _built(d2, engines, profile="default")[0][0].directory
    assert second != first and second.parent == first.parent  # two valid plans of profile 'default'
    choice = select_backends(["vae_decoder"], engines, device=H100, tensorrt_status=_trt_ok)["vae_decoder"]
    assert choice.backend == "tensorrt" and len(choice.plan_dirs) == 1 and choice.reason.startswith("valid plan ")


def test_a_plan_for_the_old_profile_shapes_is_not_selected(onnx_dir: Path, tmp_path: Path) -> None:
    """A re-export that changed only a profile's shapes (same graph file, same sha256): the plan built for the
    old shapes is not selected for the new manifest (it would refuse the calls the new profile allows)."""
    engines = tmp_path / "engines"
    _built(onnx_dir, engines, profile="default")
    m = load_manifest(onnx_dir)
    g = m.graphs["vae_decoder_fp16"]
    wider = replace(m, graphs={g.name: replace(g, profiles={"default": {"x": ProfileShapes((1, 8), (2, 8), (8, 8))}})})
    assert select_backends(["vae_decoder"], engines, device=H100, tensorrt_status=_trt_ok,
                           manifest=m)["vae_decoder"].backend == "tensorrt"
    got = select_backends(["vae_decoder"], engines, device=H100, tensorrt_status=_trt_ok, manifest=wider)
    assert got["vae_decoder"].backend == "onnxruntime" and "profile_shapes" in got["vae_decoder"].reason


def test_the_runner_casts_floats_and_checks_ranks(onnx_dir: Path, tmp_path: Path) -> None:
    """A float32 tensor for a float16 input is cast (only a float/integer mix is refused); a shape of another
    rank is outside the profile; 0 contexts or graphs are refused."""
    plan_dir = _built(onnx_dir, tmp_path / "engines", profile="default")[0][0].directory
    runner = TensorRTRunner(plan_dir, device=H100)
    runner._device = torch.device("cpu")  # where the prepared input goes (a GPU in a real run)
    x = runner._prepare_input("x", torch.ones(2, 8))
    assert x.dtype == torch.float16 and torch.equal(x, torch.ones(2, 8, dtype=torch.float16))
    assert runner.covers({"x": (2, 8)})
    assert not runner.covers({"x": (2,)}) and not runner.covers({"x": (2, 8, 1)})
    with pytest.raises(InputError, match=r"shape \[2, 8, 1\]"):
        runner._check_shape("x", (2, 8, 1))
    for bad in ({"max_contexts": 0}, {"max_graphs": 0}):
        with pytest.raises(InputError, match="max_contexts and max_graphs must be >= 1"):
            TensorRTRunner(plan_dir, device=H100, **bad)


def test_an_engine_whose_io_differs_from_its_sidecar_is_refused(onnx_dir: Path, tmp_path: Path) -> None:
    """An engine whose tensors are of other types than its sidecar says (a plan replaced under its sidecar) is
    refused when loaded, before outputs of the wrong type are allocated."""
    runner = TensorRTRunner(_built(onnx_dir, tmp_path / "engines")[0][0].directory, device=H100)
    runner._engine = _io_engine({"x": "HALF", "y": "HALF"})
    runner._check_io(_IO_TRT)
    runner._engine = _io_engine({"x": "HALF", "y": "FLOAT"})
    with pytest.raises(EngineMismatch, match="engine I/O .* differs from its sidecar"):
        runner._check_io(_IO_TRT)


def test_a_context_waits_for_its_last_call_only_from_another_stream() -> None:
    """A context (or graph) last used on another stream makes the new stream wait on the device for that call
    (its activation memory is reused); on its own stream the order is already kept, and before any call there
    is nothing to wait for."""
    from megactor_rt.engine.runner import _ContextState

    waits: list[object] = []
    same, other = (SimpleNamespace(cuda_stream=h, wait_event=waits.append) for h in (7, 8))
    state = _ContextState(context=None)
    state.follow(other)
    assert waits == []
    state.done, state.done_stream = "last call", 7
    state.follow(same)
    assert waits == []
    state.follow(other)
    assert waits == ["last call"]


class _Event:
    """torch.cuda.Event on a CPU: remembers the stream it was recorded on; the device never finishes it."""

    def record(self, stream: object) -> None:
        self.stream = stream

    def query(self) -> bool:
        return False


def _stand_in_context(enqueued: list[int]) -> SimpleNamespace:
    """An execution context taking every shape and address, its enqueues noted in ``enqueued``."""
    return SimpleNamespace(set_input_shape=lambda name, shape: True, set_tensor_address=lambda name, ptr: True,
                           get_tensor_shape=lambda name: (2, 4),
                           execute_async_v3=lambda handle: enqueued.append(handle) or True)


@pytest.mark.parametrize("dynamic", [True, False])
def test_contexts_of_a_plan_with_dynamic_inputs_take_turns_on_the_device(onnx_dir: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch,
                                                                          dynamic: bool) -> None:
    """TensorRT: "If the engine supports dynamic shapes, each execution context in concurrent use must use a
    separate optimization profile" (NvInferRuntime.h, IExecutionContext). A plan holds one profile: a call on a
    second stream's context waits on the device for the last call on the first stream's (was: the two ran
    concurrently, both on profile 0); a static plan's contexts still run concurrently."""
    from megactor_rt.engine import runner as runner_mod

    monkeypatch.setattr(runner_mod.torch.cuda, "Event", _Event)
    plan_dir = _built(onnx_dir, tmp_path / "engines")[0][0].directory
    if not dynamic:  # the sidecar of a plan of static inputs
        record = replace(read_sidecar(plan_dir), inputs={"x": {"dtype": "float16", "shape": [2, 8]}})
        (plan_dir / SIDECAR_NAME).write_text(record.to_json())
    runner = TensorRTRunner(plan_dir, device=H100)
    enqueued: list[int] = []
    runner._engine = SimpleNamespace(create_execution_context=lambda: _stand_in_context(enqueued))
    runner._device = torch.device("cpu")
    waits: dict[int, list[object]] = {1: [], 2: []}
    s1, s2 = (SimpleNamespace(cuda_stream=h, wait_event=waits[h].append) for h in (1, 2))
    x = {"x": torch.zeros(2, 8, dtype=torch.float16)}
    first = runner._context_for(s1)
    runner._infer_eager(first, x, {"x": (2, 8)}, s1)
    second = runner._context_for(s2)  # the first is still running on the device: a context of its own
    assert second is not first
    runner._infer_eager(second, x, {"x": (2, 8)}, s2)
    assert enqueued == [1, 2]
    assert [e.stream for e in waits[2]] == ([s1] if dynamic else [])  # s2 after s1's call, on the device
    runner._infer_eager(first, x, {"x": (2, 8)}, s1)
    assert [e.stream for e in waits[1]] == ([s2] if dynamic else [])  # and s1's next after s2's
    assert runner.serial is dynamic


class _CopySpy(torch.Tensor):
    """A CPU tensor noting how it is moved (``pin_memory``, ``to``) instead of moving (this machine has no GPU)."""

    moves: list[tuple[str, dict]] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206
        name = getattr(func, "__name__", "")
        if name in ("pin_memory", "to"):
            cls.moves.append((name, dict(kwargs or {})))
            return args[0]
        return super().__torch_function__(func, types, args, kwargs)


def test_a_host_input_is_copied_to_the_gpu_without_a_host_wait(onnx_dir: Path, tmp_path: Path) -> None:
    """The graph backends make the UNet's and ReferenceNet's timestep on the host at every call: the runner copies
    it from pinned memory without blocking, so the copy is queued like a kernel (was: a copy from pageable memory,
    after which torch synchronizes the stream: the host waited for all the work queued before every call)."""
    runner = TensorRTRunner(_built(onnx_dir, tmp_path / "engines")[0][0].directory, device=H100)
    runner._device = torch.device("cuda", 0)
    _CopySpy.moves = []
    runner._prepare_input("x", torch.zeros(2, 8, dtype=torch.float16).as_subclass(_CopySpy))
    assert [m for m, _ in _CopySpy.moves][:2] == ["pin_memory", "to"], _CopySpy.moves
    assert _CopySpy.moves[1][1].get("non_blocking") is True


def _two_graph_export(tmp_path: Path) -> Path:
    d = tmp_path / "onnx2g"
    d.mkdir()
    graphs = {}
    for sub in ("vae_decoder", "vae_encoder"):
        sha = _write_onnx(d / f"{sub}.fp16.onnx")
        graphs[f"{sub}_fp16"] = _graph_json(f"{sub}.fp16.onnx", sha, submodel=sub)
    (d / "manifest.json").write_text(json.dumps({"format": 1, "graphs": graphs}))
    return d


def test_build_engines_checks_every_graph_file_before_building(tmp_path: Path) -> None:
    """A damaged graph late in the list is named before any plan is built (it stopped a run after the long
    builds of the graphs before it)."""
    d = _two_graph_export(tmp_path)
    (d / "vae_encoder.fp16.onnx").write_bytes((d / "vae_encoder.fp16.onnx").read_bytes()[:-5])
    with pytest.raises(EngineMismatch, match="graph 'vae_encoder_fp16': .* the export is inconsistent"):
        _built(d, tmp_path / "engines", profile="default")
    assert not (tmp_path / "engines").exists() or not list(iter_plan_dirs(tmp_path / "engines"))


def test_build_engines_at_the_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str],
                                           caplog: pytest.LogCaptureFixture) -> None:
    """One readable line per plan (was the BuildResult's repr); a plan that cannot be written (a full disk) is
    named with exit 2 (was "unexpected error", exit 1), and the plans done before it are named as kept."""
    import errno

    from megactor_rt import cli
    from megactor_rt.engine import cache as cache_mod

    d = _two_graph_export(tmp_path)
    fake = FakeBuilder()
    monkeypatch.setattr(builder_mod, "import_tensorrt", lambda: object())
    monkeypatch.setattr(builder_mod.DeviceInfo, "current", classmethod(lambda cls, device=None: H100))
    monkeypatch.setattr(builder_mod, "_build_plan_trt", fake)
    argv = ["-q", "build-engines", "--onnx", str(d), "--out", str(tmp_path / "eng"), "--profile", "default"]
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:3] for line in lines] == [["vae_decoder_fp16", "default", "built"],
                                                   ["vae_encoder_fp16", "default", "built"]]
    assert "no valid plan" in lines[0] and str(tmp_path / "eng") in lines[0] and "BuildResult" not in lines[0]
    seen: list[bool] = []
    monkeypatch.setattr(builder_mod, "_build_plan_trt", lambda job, options, cache: (seen.append(options.verbose),
                                                                                    fake(job, options, cache))[1])
    # -v: TensorRT's logger at VERBOSE (through logging)
    assert cli.main(["-v", *argv[1:4], "--out", str(tmp_path / "eng-v"), *argv[-2:]]) == 0
    assert seen == [True, True]
    capsys.readouterr()

    real = cache_mod.write_atomic

    def full_disk(path: Path, data: bytes) -> None:
        if "vae-encoder" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(cache_mod, "write_atomic", full_disk)
    assert cli.main([*argv[:-2], "--out", str(tmp_path / "eng2"), "--profile", "default"]) == 2
    err = capsys.readouterr().err
    assert "cannot write the plan of vae_encoder_fp16[default] ([Errno 28] No space left on device)" in err
    assert "the plans done before are kept: vae_decoder_fp16[default] (built)" in caplog.text


def test_build_engines_reuses_valid_plans_in_a_folder_this_user_may_not_write(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """``build-engines --out`` a folder of valid plans this user may only read (a shared, read-only cache):
    every plan is skipped, exit 0 (was refused before any work: "--out cannot be written", though nothing was to
    be written); a plan that must be built there is refused before its build, naming the folder, exit 2."""
    import os

    from megactor_rt import cli

    d, eng = _two_graph_export(tmp_path), tmp_path / "eng"
    fake = FakeBuilder()
    monkeypatch.setattr(builder_mod, "import_tensorrt", lambda: object())
    monkeypatch.setattr(builder_mod.DeviceInfo, "current", classmethod(lambda cls, device=None: H100))
    monkeypatch.setattr(builder_mod, "_build_plan_trt", fake)
    argv = ["-q", "build-engines", "--onnx", str(d), "--out", str(eng), "--profile", "default"]
    assert cli.main(argv) == 0 and len(fake.calls) == 2
    capsys.readouterr()
    before = {p: p.stat().st_mtime_ns for p in eng.rglob("*")}
    real_access = os.access  # chmod cannot be used: tests may run as root, which ignores it
    monkeypatch.setattr("megactor_rt.files.os.access", lambda p, mode: False if Path(p).is_relative_to(eng)
                        else real_access(p, mode))
    assert cli.main(argv) == 0, capsys.readouterr().err
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:3] for line in lines] == [["vae_decoder_fp16", "default", "skipped"],
                                                   ["vae_encoder_fp16", "default", "skipped"]]
    assert len(fake.calls) == 2 and {p: p.stat().st_mtime_ns for p in eng.rglob("*")} == before
    assert cli.main([*argv[:-1], "big"]) == 2  # no plan of that profile yet: one is to be built
    err = capsys.readouterr().err
    assert f"{eng}: the engine folder (--out) cannot be written ({eng / 'vae-decoder-fp16'} is not a writable folder), " \
        "and vae_decoder_fp16[big] has no valid plan there to reuse; nothing was built" in err
    assert len(fake.calls) == 2 and {p: p.stat().st_mtime_ns for p in eng.rglob("*")} == before


def test_the_strongly_typed_flag_is_taken_where_it_exists_and_not_needed_from_11_on() -> None:
    """10.x needs NetworkDefinitionCreationFlag.STRONGLY_TYPED (1 << 1 there); 11.x deprecates it (strongly typed
    always): a release without it builds with no flags, while a release before 10 without it is refused."""
    def trt(version: str, **members: int) -> SimpleNamespace:
        return SimpleNamespace(__version__=version, NetworkDefinitionCreationFlag=SimpleNamespace(**members))

    assert builder_mod._network_flags(trt("10.0.1", STRONGLY_TYPED=1)) == 2
    assert builder_mod._network_flags(trt("11.4.0", STRONGLY_TYPED=0)) == 1
    assert builder_mod._network_flags(trt("12.0.0")) == 0
    with pytest.raises(builder_mod.EngineBuildError, match="TensorRT 9.2.0 has no strongly typed networks"):
        builder_mod._network_flags(trt("9.2.0"))


def test_tensorrts_messages_go_through_logging(fake_trt, caplog: pytest.LogCaptureFixture) -> None:
    """The shared TensorRT logger is an ILogger passing TensorRT's messages to `logging` (trt.Logger writes to
    stderr itself, past the CLI's handlers and --log-json): those of its level and worse, each at its level."""
    from megactor_rt.engine.cache import trt_logger

    log = trt_logger(fake_trt, verbose=False)
    assert isinstance(log, fake_trt.ILogger) and not isinstance(log, fake_trt.Logger)
    fake_trt.Builder(log)  # (TensorRT takes it: its pybind11 base was initialised)
    with caplog.at_level(logging.DEBUG, logger="megactor_rt.engine.tensorrt"):
        for severity, msg in ((fake_trt.ILogger.ERROR, "parse failed"), (fake_trt.ILogger.WARNING, "int64 cast"),
                              (fake_trt.ILogger.INFO, "tactics"), (fake_trt.ILogger.VERBOSE, "layer 7")):
            log.log(severity, msg)
        trt_logger(fake_trt, verbose=True)
        log.log(fake_trt.ILogger.VERBOSE, "layer 8")
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.ERROR, "TensorRT: parse failed"), (logging.WARNING, "TensorRT: int64 cast"),
        (logging.DEBUG, "TensorRT: layer 8")]
    trt_logger(fake_trt, verbose=False)


def test_the_readme_says_which_parts_of_a_plan_path_are_slugged(tmp_path: Path) -> None:
    """engine/README.md: the graph, GPU and profile names are lower case with other characters made ``-``; the
    ``_`` between the key's parts stays (it read "each name", as if the whole folder name were)."""
    key = EngineKey(H100, "fp16", "0" * 64, "My Profile", {"x": [[1], [1], [1]]})
    got = plan_dir(tmp_path, "Temporal_UNet.fp16", key).relative_to(tmp_path).as_posix()
    assert got.startswith("temporal-unet.fp16/nvidia-h100-80gb-hbm3_sm90_trt11.1.0.106_fp16_my-profile_")
    readme = " ".join((Path(__file__).parents[1] / "engine" / "README.md").read_text().split())
    assert "The graph, GPU and profile names in these paths are lower case" in readme
