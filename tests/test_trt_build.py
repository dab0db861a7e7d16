"""tools/trt_build.build_plan over a mock of TensorRT's builder API (TensorRT itself cannot run
here, docs/tensorrt.md): the aliasing preview feature is on when the network is built, the built
plan's aliasing is checked before anything is written, and engine.json records the versions. The
mock records what it is asked and answers as the TensorRT Python API does; the plan's bytes are
opaque."""

import json
import sys
from types import SimpleNamespace

import pytest
from conftest import randomize_

from lasad_engine import LasadConfig, LasadGen
from lasad_plugins import contract as C
from lasad_plugins.lasad_step import defs, plan
from lasad_plugins.lasad_step.plan import PlanRefused, check_aliasing

pytest.importorskip("onnx")

FEATURE = "ALIASED_PLUGIN_IO_10_03"


class Mode:
    def __init__(self, name):
        self.name = name


class FakeEngine:
    """ICudaEngine's I/O queries for a step graph of `n_layer` layers."""

    def __init__(self, n_layer, aliases=None, drop=(), shapes=None, query=True):
        self.io = {"ids": ("INPUT", (-1,), "INT64"), "pos": ("INPUT", (1,), "INT64"),
                   "width": ("INPUT", (1,), "INT64"), "logits": ("OUTPUT", (-1, 64), "FLOAT")}
        for i in range(n_layer):
            for name, mode in ((C.PAST_STATE.format(i), "INPUT"), (C.PRESENT_STATE.format(i), "OUTPUT")):
                self.io[name] = (mode, (shapes or {}).get(name, (-1, 2, 24, 32)), "FLOAT")
        for name in drop:
            del self.io[name]
        self.aliases = aliases or {}
        if query:
            self.get_aliased_input_tensor = lambda name: self.aliases.get(name)

    num_io_tensors = property(lambda self: len(self.io))

    def get_tensor_name(self, i):
        return list(self.io)[i]

    def get_tensor_mode(self, name):
        return Mode(self.io[name][0])

    def get_tensor_shape(self, name):
        return self.io[name][1]

    def get_tensor_dtype(self, name):
        return self.io[name][2]


def fake_tensorrt(engine, with_feature=True, honours_feature=True):
    """The builder API calls build_plan makes, recording the preview features at build time."""
    seen = {}

    class Config:
        def __init__(self):
            self.features = {}

        def set_preview_feature(self, feature, on):
            if honours_feature:
                self.features[feature] = on

        def get_preview_feature(self, feature):
            return self.features.get(feature, False)

        def add_optimization_profile(self, profile):
            seen["profile"] = profile.shapes

        def create_timing_cache(self, data):
            return data

        def set_timing_cache(self, cache, ignore_mismatch):
            pass

        def get_timing_cache(self):
            return SimpleNamespace(serialize=lambda: b"cache")

    class Network:
        num_inputs = 0

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            seen["flags"] = flags
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return SimpleNamespace(shapes={}, set_shape=lambda name, *s: None)

        def build_serialized_network(self, network, config):
            seen["features_at_build"] = dict(config.features)
            return b"PLAN"

    class Parser:
        num_errors = 0

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            seen["parsed"] = path
            return True

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            seen["deserialized"] = data
            return engine

    class Logger:
        WARNING, VERBOSE = 1, 0

        def __init__(self, severity):
            pass

    preview = SimpleNamespace(**({FEATURE: FEATURE} if with_feature else {}))
    trt = SimpleNamespace(__version__="10.9.0", Logger=Logger, Builder=Builder, OnnxParser=Parser, Runtime=Runtime,
                          PreviewFeature=preview, NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=0))
    return trt, seen


@pytest.fixture(scope="module")
def step_onnx(tmp_path_factory):
    from lasad_tools.onnx_export import export_step
    cfg = LasadConfig.from_preset("lasad-tiny", vocab_size=64, grid_height=4, grid_width=5)
    model = randomize_(LasadGen(cfg), seed=1).eval()
    return export_step(model, tmp_path_factory.mktemp("build") / "step.onnx", max_batch=2, meta={"tokenizer": "v.pt"}), cfg


@pytest.fixture
def build(monkeypatch, tmp_path, step_onnx):
    from lasad_tools.trt_build import build_plan
    path, cfg = step_onnx
    monkeypatch.setattr(defs, "register", lambda: defs.PLUGIN_ID)  # TensorRT's plugin API is not here
    monkeypatch.setattr(defs, "compile_nodes", lambda path: [SimpleNamespace(ptx_isa=90)] * cfg.n_layer)
    monkeypatch.setattr(plan, "current_fingerprint", lambda opset: {"tensorrt": "10.9.0", "opset": opset})
    monkeypatch.setattr(plan, "versions", lambda: {"tensorrt": "10.9.0", "cuda_driver": "13.0", "triton": "3.6.0",
                                                   "plugin": plan.PLUGIN})

    def run(engine, **kw):
        trt, seen = fake_tensorrt(engine, **kw)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        out = tmp_path / "engine.plan"
        build_plan(path, out, max_rows=4, opset=17, meta={"tokenizer": "../v.pt"})
        seen["written"] = sorted(p.name for p in tmp_path.iterdir())
        return out, seen
    return run, cfg, tmp_path


def test_build_turns_on_aliasing_and_records_versions(build):
    run, cfg, _ = build
    engine = FakeEngine(cfg.n_layer, aliases={C.PRESENT_STATE.format(0): C.PAST_STATE.format(0)})
    out, seen = run(engine)
    assert seen["features_at_build"] == {FEATURE: True} and seen["deserialized"] == b"PLAN"
    assert out.read_bytes() == b"PLAN" and seen["written"] == ["engine.json", "engine.plan"]
    record = json.loads(out.with_suffix(".json").read_text())
    assert {k: record[k] for k in ("tensorrt", "cuda_driver", "triton", "plugin", "kernel_ptx_isa")} == {
        "tensorrt": "10.9.0", "cuda_driver": "13.0", "triton": "3.6.0", "plugin": "lasad::LasadStep/1",
        "kernel_ptx_isa": "9.0"}
    assert record["aliases_reported"] == {C.PRESENT_STATE.format(i): C.PAST_STATE.format(i) if i == 0 else None
                                          for i in range(cfg.n_layer)}
    assert record["meta"] == {"tokenizer": "../v.pt"} and record["config"]["n_layer"] == cfg.n_layer


@pytest.mark.parametrize("case,message", [
    ("wrong alias", "aliases present_state.1 to past_state.0, not to past_state.1"),
    ("no present", "the plan has no output present_state.0"),
    ("shape", "cannot alias past_state.1"),
    ("no feature", "has no PreviewFeature.ALIASED_PLUGIN_IO_10_03"),
    ("feature ignored", "did not turn on PreviewFeature.ALIASED_PLUGIN_IO_10_03"),
    ("kernel", "the LasadStep kernel cannot be built for TensorRT here: .* uses Triton's hidden parameter"),
])
def test_a_plan_that_would_not_alias_or_launch_is_refused_and_not_written(build, monkeypatch, case, message):
    run, cfg, folder = build
    kw, engine = {}, FakeEngine(cfg.n_layer)
    if case == "kernel":
        from lasad_engine.ops.lasad.aot import KernelABIError

        def fails(path):
            raise KernelABIError("lasad_step_plugin_kernel: the PTX uses Triton's hidden parameter k_param_8")
        monkeypatch.setattr(defs, "compile_nodes", fails)
    elif case == "wrong alias":
        engine = FakeEngine(cfg.n_layer, aliases={C.PRESENT_STATE.format(1): C.PAST_STATE.format(0)})
    elif case == "no present":
        engine = FakeEngine(cfg.n_layer, drop=[C.PRESENT_STATE.format(0)])
    elif case == "shape":
        engine = FakeEngine(cfg.n_layer, shapes={C.PRESENT_STATE.format(1): (-1, 2, 24, 31)})
    else:
        kw = {"with_feature": case != "no feature", "honours_feature": False}
    with pytest.raises(PlanRefused, match=message) as e:
        run(engine, **kw)
    assert "\n" not in str(e.value)
    assert list(folder.iterdir()) == []  # no plan, no engine.json, no temporary file


def test_check_aliasing_without_the_engine_query():
    """A TensorRT whose engine cannot report aliasing: the I/O pairs are still checked."""
    engine = FakeEngine(3, query=False)
    assert check_aliasing(engine, 3) == {C.PRESENT_STATE.format(i): None for i in range(3)}
    with pytest.raises(PlanRefused, match="no input past_state.2"):
        check_aliasing(FakeEngine(3, drop=[C.PAST_STATE.format(2)], query=False), 3)


@pytest.mark.parametrize("tensorrt,aot,triton,message", [
    (None, False, "3.6.0", "TensorRT >= 10.9 with its Python plugin API"),
    ("10.8.0", False, "3.6.0", "TensorRT >= 10.9 is needed for the plugin's ahead-of-time kernel .*found 10.8.0"),
    ("10.9.0", True, "3.2.0", "Triton >= 3.3 compiles the plugin's kernel, found 3.2.0"),
])
def test_version_floors_are_named_in_one_line(monkeypatch, tensorrt, aot, triton, message):
    from lasad_plugins.lasad_step.defs import PluginUnavailable, check_versions
    monkeypatch.setattr(defs, "trtp", None if tensorrt is None else SimpleNamespace(**({"aot_impl": 1} if aot else {})))
    monkeypatch.setitem(sys.modules, "tensorrt", SimpleNamespace(__version__=tensorrt))
    monkeypatch.setitem(sys.modules, "triton", SimpleNamespace(__version__=triton))
    with pytest.raises(PluginUnavailable, match=message) as e:
        check_versions()
    assert "\n" not in str(e.value) and "pip install -e '.[tensorrt]' in lasad's folder" in str(e.value)


def test_compiling_the_kernel_needs_triton_3_3(monkeypatch):
    from lasad_engine.ops.lasad import aot
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setitem(sys.modules, "triton", SimpleNamespace(__version__="3.2.0"))
    constants, warps = aot.plugin_kernel_constants(64, 64, "unit", True, 0.125)
    with pytest.raises(aot.KernelABIError, match="needs Triton >= 3.3, found 3.2.0"):
        aot.compile_step_kernel(constants, warps, aot.CudaTarget(90, (13, 0)))
