"""Layering: who may run models, who may mutate them, where op types are matched, how skips are reported.

Import-graph and source checks read the package's own files; behavioural checks run on small models.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

import graphprune
from graphprune import _ir
from graphprune.errors import GraphpruneError
from graphprune.io import load_model
from graphprune.passes import Skip, Skipped

PKG = Path(graphprune.__file__).parent
ANALYSIS = sorted((PKG / "analysis").glob("*.py"))
PASSES = sorted((PKG / "passes").glob("*.py"))


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(module imported, imported inside a function or a TYPE_CHECKING block) for every import in ``path``."""
    tree = ast.parse(path.read_text())
    nested: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or (
                isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)):
            nested.update(id(n) for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in nested) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.module or "", id(node) in nested))
    return out


def _bytes(model: ir.Model) -> bytes:
    return ir.to_proto(model).SerializeToString()


# -- import graph and sources -------------------------------------------------------------------------------------
def test_import_graphprune_does_not_load_onnxruntime():
    code = ("import sys, graphprune, graphprune.analysis.channels, graphprune.analysis.importance, graphprune.verify;"
            "graphprune.registry();"
            "print('onnxruntime' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=PKG.parent)
    assert out.stdout.strip() == "False", out.stderr


#: Not part of the running package: the ``model.py`` that ``graphprune deploy`` copies into a Triton model repository,
#: run by Triton's python backend in its own interpreter, without graphprune.
_STANDALONE = {"deploy/_python_model.py"}


def test_only_the_backend_imports_onnxruntime_and_creates_sessions():
    importers, sessions = [], []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).as_posix()
        if rel in _STANDALONE:
            continue
        if any(mod.split(".")[0] == "onnxruntime" for mod, _ in _imports(path)):
            importers.append(rel)
        if re.search(r"InferenceSession\(", path.read_text()):
            sessions.append(rel)
    assert importers == ["backends/onnxruntime.py"]
    assert sessions == ["backends/onnxruntime.py"]
    src = (PKG / "backends" / "onnxruntime.py").read_text()
    assert len(re.findall(r"\bort\.InferenceSession\(", src)) == 3 and src.count("def make_session(") == 1
    assert all(m.startswith("    ") for m in re.findall(r"^.*\bimport onnxruntime\b.*$", src, re.M))  # lazily


def test_analysis_never_imports_backends_or_passes():
    for path in ANALYSIS:
        for mod, _ in _imports(path):
            assert not mod.startswith(("graphprune.backends", "graphprune.passes", "graphprune.pipeline")), (path, mod)


def test_passes_match_no_op_types():
    """Op-type strings are matched in analysis/ and ops/; passes consume typed facts."""
    pattern = re.compile(r"\.op_type\s*(==|!=|\bin\b|\bnot\s+in\b)|\bop_type\s+in\s*\(|\.op_type\.startswith")
    hits = [f"{p.name}:{i}" for p in PASSES for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []


def test_one_mask_convention_in_passes():
    """Passes build additive masks with _ir.additive_mask only (no -inf or finfo constants of their own)."""
    hits = [f"{p.name}:{i}" for p in PASSES for i, line in enumerate(p.read_text().splitlines(), 1)
            if re.search(r"finfo\(|\(\s*-np\.inf\s*\)", line)]
    assert hits == []


def test_channel_analysis_has_no_deferred_imports_and_no_cycles():
    channel = ANALYSIS + sorted((PKG / "passes").glob("_channel_*.py")) + [PKG / "passes" / "channel_prune.py"]
    deferred = [(p.name, m) for p in channel for m, nested in _imports(p) if nested and m.startswith("graphprune")]
    assert deferred == []
    mods = [f"graphprune.analysis.{p.stem}" for p in ANALYSIS if p.stem != "__init__"]
    mods += [f"graphprune.passes.{p.stem}" for p in PASSES if p.stem != "__init__"]
    code = ("import importlib, sys\n"
            f"for name in {mods!r}:\n"
            "    for k in [k for k in sys.modules if k.startswith('graphprune')]:\n"
            "        del sys.modules[k]\n"
            "    importlib.import_module(name)\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PKG.parent)
    assert out.stdout.strip() == "ok", out.stderr


def test_one_channel_rule_registry():
    from graphprune.analysis import _channel_core, channels  # noqa: F401 - importing channels fills the registry

    rules = _channel_core.RULES
    assert {"Conv", "Gemm", "MatMul", "Gather"} <= {op for op, r in rules.items() if r.producer}
    assert {"Reshape", "Transpose", "Slice", "Split", "Add", "Relu", "LayerNormalization", "Shape"} <= set(rules)
    assert not rules["Concat"].data_first and not rules["Add"].data_first and rules["Reshape"].data_first


# -- the IR helpers -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE],
                         ids=lambda d: d.name)
def test_additive_mask_values_per_dtype(dtype):
    low = _ir.mask_min(dtype)
    assert low.dtype == dtype.numpy() and low == ml_dtypes.finfo(dtype.numpy()).min and np.isfinite(low)
    mask = ir.Value(name="m", type=ir.TensorType(ir.DataType.BOOL), shape=ir.Shape([2, 3]))
    t = ir.tape.Tape()
    out = _ir.additive_mask(t, mask, dtype)
    assert [n.op_type for n in t.nodes] == ["Constant", "Constant", "Where"]
    zero, fill = (_ir.const_value(v) for v in out.producer().inputs[1:])
    assert zero.dtype == fill.dtype == dtype.numpy() and zero == 0 and fill == low
    if dtype == ir.DataType.BFLOAT16:
        return  # ORT's CPU Where has no bfloat16 kernel; the constants above are the whole convention
    out.name = "bias"
    graph = ir.Graph([mask], [out], nodes=t.nodes, opset_imports={"": 18}, name="g")
    from graphprune.backends.onnxruntime import run

    keep = np.array([[True, False, True], [False, False, True]])
    got = run(ir.Model(graph, ir_version=10), {"m": keep})[0]
    assert got.dtype == dtype.numpy()
    np.testing.assert_array_equal(got, np.where(keep, 0, low).astype(dtype.numpy()))


def test_const_value_reads_initializers_and_every_constant_attribute():
    cases = {"value_float": (1.5, np.float32), "value_floats": ([1.0, 2.0], np.float32), "value_int": (4, np.int64),
             "value_ints": ([1, 2, 3], np.int64), "value": (ir.tensor(np.arange(3, dtype=np.int32)), np.int32)}
    for key, (value, dtype) in cases.items():
        node = ir.node("Constant", [], {key: value})
        arr = _ir.const_value(node.outputs[0])
        assert arr is not None and arr.dtype == dtype, key
        assert _ir.constant_node(node.outputs[0]) is node
    init = ir.Value(name="w", const_value=ir.tensor(np.ones((2, 2), np.float32)))
    assert _ir.const_value(init).shape == (2, 2) and _ir.constant_node(init) is None
    assert _ir.const_value(ir.Value(name="x")) is None and _ir.const_value(None) is None


def test_name_scope_avoids_every_value_name():
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2]))
    relu = ir.node("Relu", [x])
    relu.outputs[0].name = "w_1"
    graph = ir.Graph([x], [relu.outputs[0]], nodes=[relu], opset_imports={"": 18})
    graph.register_initializer(ir.Value(name="w", const_value=ir.tensor(np.zeros(2, np.float32))))
    names = _ir.NameScope(graph)
    assert [names.fresh(b) for b in ("w", "w", "x", "y")] == ["w_2", "w_3", "x_1", "y"]
    v = names.initializer("w", np.arange(3, dtype=np.int64))
    assert v.name == "w_4" and graph.initializers["w_4"] is v and v.dtype == ir.DataType.INT64


# -- analysis is pure; the backend probes without touching the model ------------------------------------------------
def test_analysis_functions_do_not_mutate_the_model(export):
    from graphprune.analysis import count_flops, find_attention_blocks, summarize
    from graphprune.analysis.channels import analyze_channels
    from graphprune.analysis.flops import static_shapes, unresolved_values
    from graphprune.analysis.importance import activation_values, compute_importance
    from graphprune.analysis.inputs import example_inputs
    from graphprune.analysis.linear import linear_map
    from graphprune.analysis.shapes import concrete_shapes, input_dims
    from graphprune.analysis.tokens import token_sites
    from graphprune.backends.onnxruntime import measure_flops as measured_flops
    from graphprune.backends.onnxruntime import probe, runtime_shapes

    model = load_model(export("vit_tiny"))
    before, nodes, outputs = _bytes(model), list(model.graph), list(model.graph.outputs)
    input_shapes = [v.shape for v in model.graph.inputs]

    blocks = find_attention_blocks(model)
    summarize(model)
    count_flops(model, batch=2)
    shapes = concrete_shapes(model, input_dims(model, batch=3))
    assert shapes[model.graph.inputs[0].name][0] == 3  # inferred at batch 3 ...
    assert [v.shape for v in model.graph.inputs] == input_shapes  # ... while the model keeps its symbolic batch
    unresolved_values(model, static_shapes(model))
    analysis = analyze_channels(model)
    compute_importance(analysis, "l2")
    values = activation_values(analysis)
    feeds = [example_inputs(model, batch=2, seed=s) for s in range(2)]
    imp = compute_importance(analysis, "activation", probe(model, values, feeds))
    assert imp.scores and all(np.isfinite(s).all() for s in imp.scores.values())
    [linear_map(m) for m in analysis.members if m.role == "in"]
    token_sites(blocks[0].residual_out)
    runtime_shapes(model, values[:3], feeds[0])
    measured_flops(model)

    assert _bytes(model) == before
    assert list(model.graph) == nodes and list(model.graph.outputs) == outputs
    flagged = [v for node in model.graph for v in node.outputs if v.is_graph_output()]
    assert set(flagged) <= set(outputs)  # no value still believes it is a (temporary) output


def test_probe_reads_intermediate_values_of_a_snapshot():
    from graphprune.backends.onnxruntime import Probe, probe

    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["B", 4]))
    wv = ir.Value(name="w", const_value=ir.tensor(w, name="w"))
    mm = ir.node("MatMul", [x, wv])
    relu = ir.node("Relu", [mm.outputs[0]])
    relu.outputs[0].name = "y"
    graph = ir.Graph([x], [relu.outputs[0]], nodes=[mm, relu], initializers=[wv], opset_imports={"": 18})
    model = ir.Model(graph, ir_version=10)
    hidden = mm.outputs[0]
    feed = {"x": rng.standard_normal((2, 4)).astype(np.float32)}

    snapshot = Probe(model, [hidden, relu.outputs[0], hidden])
    assert list(model.graph.outputs) == [relu.outputs[0]] and not hidden.is_graph_output()
    got = snapshot(feed)
    np.testing.assert_allclose(got[0], feed["x"] @ w, rtol=1e-5)
    np.testing.assert_allclose(got[1], np.maximum(feed["x"] @ w, 0), rtol=1e-5)
    np.testing.assert_array_equal(got[2], got[0])
    wv.const_value = ir.tensor(2 * w, name="w")  # a change after the probe was built does not reach it ...
    np.testing.assert_allclose(snapshot(feed)[0], feed["x"] @ w, rtol=1e-5)
    again = next(probe(model, [hidden], [feed]))  # ... a new probe sees it
    np.testing.assert_allclose(again[0], feed["x"] @ (2 * w), rtol=1e-5)
    assert list(probe(model, [], [feed, feed])) == [[], []]
    outsider = ir.Value(name="elsewhere")
    with pytest.raises(ValueError, match="elsewhere"):
        Probe(model, [outsider])


# -- skips are reported, never errors -----------------------------------------------------------------------------
def _attention_without_residual(path: Path) -> Path:
    """Softmax(q·kᵀ)·v on graph inputs: one attention block with 6 static tokens and no residual stream."""
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["B", 2, 6, 4]) for n in ("q", "k", "v")]
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["q", "kt"], ["s"]),
             helper.make_node("Softmax", ["s"], ["p"], axis=-1),
             helper.make_node("MatMul", ["p", "v"], ["o"])]
    graph = helper.make_graph(nodes, "attn", vi, [helper.make_tensor_value_info("o", TensorProto.FLOAT, ["B", 2, 6, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    path.write_bytes(model.SerializeToString())
    return path


def test_skip_is_not_a_user_error():
    assert not issubclass(Skip, GraphpruneError)
    assert Skip("why").record() == Skipped("model", "why") and Skip("why", "block 2").record().where == "block 2"


def test_skip_while_planning_token_drop_is_a_reported_skip(tmp_path, capsys):
    """The FLOPs budget needs every block's stream point; a block without one skips the model (exit 0)."""
    from graphprune.cli import main
    from graphprune.passes.token_drop import TokenDropPass

    src = _attention_without_residual(tmp_path / "attn.onnx")
    model = load_model(src)
    before = _bytes(model)
    result = TokenDropPass({"layers": [0], "schedule": {"flops": 0.8}})(model)
    assert not result.modified and _bytes(model) == before
    assert result.skipped == [Skipped("model", "block 0: no residual Add found after the attention output")]

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("passes:\n  - name: token_drop\n    layers: [0]\n    schedule: {flops: 0.8}\n")
    out, rep = tmp_path / "out.onnx", tmp_path / "report.json"
    try:
        main([str(a) for a in ("optimize", src, "-o", out, "--config", cfg, "--report", rep)])
        code = 0
    except SystemExit as e:
        code = e.code
    assert code == 0, capsys.readouterr().err
    entry = json.loads(rep.read_text())["passes"][0]
    assert entry["changed"] is False
    assert entry["skipped"] == [{"where": "model", "reason": "block 0: no residual Add found after the attention output"}]
    assert out.is_file()


#: Op groups outside ``analysis/vocab.py`` that are not one of its groups: the projection walk of ``attention`` (movement
#: ops plus a scale or bias) and the shape arithmetic ``tokens`` clones when the token count changes.
_OWN_GROUPS = {("analysis/attention.py", "_PASS_THROUGH"), ("analysis/tokens.py", "SHAPE_OPS")}


def test_op_groups_are_defined_once_in_the_vocabulary():
    """A set of op types with three or more broadcasting ops, or two or more reductions, is one of ``vocab``'s
    named groups (``_BROADCAST`` / ``_BROADCASTING`` / ``_REDUCE`` were once redefined per module)."""
    from graphprune.analysis import vocab

    hits = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).as_posix()
        if rel == "analysis/vocab.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Assign):
                continue
            for lit in ast.walk(node.value):
                if isinstance(lit, (ast.Set, ast.Tuple, ast.List)):
                    ops = {e.value for e in lit.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
                    name = ast.unparse(node.targets[0])
                    if (len(ops & vocab.BROADCASTING) >= 3 or len(ops & vocab.REDUCE) >= 2) and (rel, name) not in _OWN_GROUPS:
                        hits.append(f"{rel}:{node.lineno} {name}")
    assert hits == []


def test_vocabulary_predicates_check_the_domain():
    from graphprune.analysis import vocab

    std, custom = ir.Node("", "Add", []), ir.Node("ai.graphprune", "Add", [])
    assert vocab.is_broadcasting(std) and vocab.is_elementwise(std) and not vocab.is_broadcasting(custom)
    assert vocab.is_reduce(ir.Node("ai.onnx", "ReduceMean", [])) and not vocab.is_reduce(ir.Node("x", "ReduceMean", []))
    assert vocab.is_movement(ir.Node("", "Reshape", [])) and not vocab.is_unary(ir.Node("", "Reshape", []))
    assert vocab.UNARY == vocab.UNARY_MATH | vocab.VALUE_PRESERVING and not vocab.MOVEMENT & vocab.UNARY_MATH


#: Private names used across packages today, to be made public (issue 21, item 6); no new ones may appear.
_CROSS_PRIVATE = {
    ("_cli_deploy.py", "graphprune.deploy._server"), ("_cli_deploy.py", "graphprune.deploy._loadtest"),
    ("backends/plugins/__init__.py", "graphprune.ops._dims"), ("backends/tensorrt.py", "graphprune.ops._dims"),
    ("kernels/sparse_attention.py", "graphprune.ops.sparse_attention"),
    ("kernels/sparse_attention_routed.py", "graphprune.ops.sparse_attention"),
    ("passes/token_drop/dynamic.py", "graphprune.ops._base"), ("passes/token_drop/scores.py", "graphprune.ops._base"),
    ("passes/sparse_attention.py", "graphprune.ops._base"), ("passes/token_drop/drop.py", "graphprune.ops._base"),
    ("torch/_ops.py", "graphprune.ops._dims"),
}


def test_no_new_private_names_across_packages():
    """A module imports a ``_private`` module or name only from its own package (top-level helpers such as
    ``graphprune._ir`` are shared by all); the known exceptions are listed in ``_CROSS_PRIVATE``."""
    hits = set()
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).as_posix()
        own = rel.split("/")[0] if "/" in rel else ""
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or not (node.module or "").startswith("graphprune."):
                continue
            parts = node.module.split(".")
            if not (PKG / parts[1]).is_dir() or parts[1] == own:
                continue
            if any(p.startswith("_") for p in parts[2:]) or any(a.name.startswith("_") for a in node.names):
                hits.add((rel, node.module))
    assert hits - _CROSS_PRIVATE == set()


def test_no_private_names_from_another_package():
    """A subpackage's private modules (``graphprune.ops._base``) and private names (``_at_length``) are its own:
    another package imports what the subpackage's ``__init__`` (or a public module) exports. Top-level private modules
    (``graphprune._ir``) are the package's shared internals; imports inside a subpackage are free."""
    hits = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG)
        if rel.as_posix() in _STANDALONE:
            continue
        home = rel.parts[0] if len(rel.parts) > 1 else None
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                mods, names = [node.module], [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                mods, names = [a.name for a in node.names], []
            else:
                continue
            for mod in mods:
                parts = mod.split(".")
                if parts[0] != "graphprune" or len(parts) < 2 or parts[1] == home or parts[1].startswith("_"):
                    continue
                private = [p for p in parts[2:] if p.startswith("_")] + [n for n in names if n.startswith("_")]
                if private:
                    hits.append(f"{rel.as_posix()}:{node.lineno}: {mod} {private}")
    assert hits == []


def _module_imports(pkg: str) -> dict[str, set[str]]:
    """``graphprune.<pkg>`` module → the modules of that package it imports (at the top or deferred)."""
    out = {}
    for path in sorted((PKG / pkg).glob("*.py")):
        name = f"graphprune.{pkg}" if path.stem == "__init__" else f"graphprune.{pkg}.{path.stem}"
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(f"graphprune.{pkg}"):
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names
                            if (PKG / pkg / f"{a.name}.py").exists() and node.module == f"graphprune.{pkg}")
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith(f"graphprune.{pkg}"))
        out[name] = deps - {name}
    return out


def test_torch_front_end_has_no_import_cycles():
    """No module of ``graphprune.torch`` imports the package itself (its ``__init__`` only re-exports), and the
    modules' imports, deferred ones included, form no cycle (``_export`` holds ``export``; ``_tensors`` what
    ``_apply`` and ``_fx`` share)."""
    graph = _module_imports("torch")
    assert [m for m, deps in graph.items() if m != "graphprune.torch" and "graphprune.torch" in deps] == []
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            assert state.get(d) != 1, " -> ".join([*path, m, d])
            if d not in state:
                visit(d, [*path, m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_passes_run_models_only_through_their_context_runtime(tmp_path):
    """No pass imports a backend (DESIGN.md); the context's default runtime is ONNX Runtime's, and a runtime given
    to the context is the one the pass uses."""
    from graphprune.backends.onnxruntime import OnnxRuntime
    from graphprune.passes import get_pass
    from graphprune.passes.base import PassContext

    hits = [f"{p.name}: {mod}" for p in PASSES for mod, _ in _imports(p) if mod.startswith("graphprune.backends")]
    assert hits == []
    assert isinstance(PassContext().runtime, OnnxRuntime)

    class Counting(OnnxRuntime):
        calls: list[str] = []

        def probe(self, model, values, feeds):
            self.calls.append("probe")
            return super().probe(model, values, feeds)

        def measure_flops(self, model, batch=1, dims=None):
            self.calls.append("flops")
            return super().measure_flops(model, batch, dims)

    from tests.test_fidelity import mlp

    model = load_model(mlp(tmp_path / "mlp.onnx", seed=0))
    rng = np.random.default_rng(0)
    rt = Counting()
    feeds = [{"X": rng.standard_normal((20, 16)).astype(np.float32)} for _ in range(4)]
    ctx = PassContext(calibration=feeds, data_source="user", runtime=rt)
    result = get_pass("channel_prune")({"ratio": 0.25, "target": "flops"}, ctx)(model)
    assert result.modified and "probe" in rt.calls and "flops" in rt.calls
    hidden = result.model.graph.initializers["W1"].const_value.numpy().shape[1]
    assert hidden < 32 and result.model.graph.initializers["W2"].const_value.numpy().shape[0] == hidden


def test_split_modules_stay_small():
    """Issue 21: token_drop is a package of one idea per module, and the whole-head rule is three modules
    (chains and claims, rotary steps, edits); none grows back past about 400 lines."""
    paths = [*sorted((PKG / "passes" / "token_drop").glob("*.py")), *sorted((PKG / "analysis").glob("_attention_*.py"))]
    assert len(paths) >= 12
    sizes = {p.relative_to(PKG).as_posix(): len(p.read_text().splitlines()) for p in paths}
    assert max(sizes.values()) <= 400, sizes
