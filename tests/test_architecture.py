"""The package's shape: imports point one way (cli -> tasks -> core), no cycles, no
function-local imports except optional heavy extras, and nothing reads tests/ or ../shared."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "bpnet_jax")

# Layers from the bottom up; a module may import only from its own layer or below (and never
# from a module that imports it back). Subpackages not listed (e.g. detectnet_v2) are a layer of
# their own above the shared core: checked for cycles only.
LAYERS = [
    {"errors", "fileio", "skeleton", "schedules", "data.records"},
    {"model", "losses", "optimizer", "targets", "augment", "data.dataset_spec",
     "data.synthetic", "data.convert", "data.input_pipeline", "data.synthetic_dataset",
     "inference.postprocess", "inference.visualize"},
    {"config"},
    {"checkpoint", "inference.preprocess"},
    {"prune", "import_weights", "inference.backends", "inference.predictor",
     "export.int8"},
    {"inference.detections", "inference.coco_eval", "export.onnx_model"},
    {"export.runtimes", "train"},
    {"export.task", "demo"},
    {"cli"},
]
# Imported only inside the functions that need them, with a clear message when missing.
# (torch and h5py: only to read .pth / Keras .h5 weights in `bpnet import_weights`.)
OPTIONAL = {"onnx", "onnxruntime", "jax2onnx", "tensorflow", "tensorrt", "torch", "h5py",
            "jax.experimental.jax2tf"}


def _modules():
  out = {}
  for root, _, files in os.walk(PACKAGE):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(root, f)
        rel = os.path.relpath(path, PACKAGE)[:-3].replace(os.sep, ".")
        out[rel.removesuffix(".__init__") if rel != "__init__" else ""] = path
  return out


def _imports(path):
  """(module-level bpnet_jax imports, function-local imports) of a file."""
  tree = ast.parse(open(path).read())
  top, local = set(), []

  def names(node):
    if isinstance(node, ast.Import):
      return [a.name for a in node.names]
    base = node.module or ""
    return [f"{base}.{a.name}" for a in node.names] + ([base] if base.startswith("bpnet_jax")
                                                       else [])

  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      for inner in ast.walk(node):
        if isinstance(inner, (ast.Import, ast.ImportFrom)):
          local.extend(names(inner))
  for node in tree.body:
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      top.update(n[len("bpnet_jax."):] for n in names(node) if n.startswith("bpnet_jax."))
  return top, local


def test_no_import_cycles_and_imports_point_down():
  modules = _modules()
  graph = {}
  for name, path in modules.items():
    top, _ = _imports(path)
    graph[name] = {m for m in top if m in modules and m != name}
  # Cycles (depth-first search).
  state = {}

  def visit(node, stack):
    state[node] = 1
    for dep in graph[node]:
      if state.get(dep) == 1:
        pytest.fail(f"import cycle: {' -> '.join(stack + [node, dep])}")
      if dep not in state:
        visit(dep, stack + [node])
    state[node] = 2
  for node in graph:
    if node not in state:
      visit(node, [])
  # Layering.
  rank = {m: i for i, layer in enumerate(LAYERS) for m in layer}
  for name, deps in graph.items():
    if name not in rank:
      continue
    for dep in deps:
      if dep in rank and rank[dep] > rank[name]:
        pytest.fail(f"bpnet_jax.{name} (layer {rank[name]}) imports bpnet_jax.{dep} "
                    f"(layer {rank[dep]}): imports must point down")


def test_every_core_module_has_a_layer():
  core = {m for m in _modules() if m and not m.startswith("detectnet_v2")
          and not m.endswith("__init__") and m not in ("data", "inference", "export")}
  assert core <= {m for layer in LAYERS for m in layer}, core - {m for l in LAYERS for m in l}


def test_function_local_imports_are_optional_extras_only():
  for name, path in _modules().items():
    _, local = _imports(path)
    bad = [m for m in local if not any(m == o or m.startswith(o + ".") for o in OPTIONAL)]
    assert not bad, f"bpnet_jax.{name} imports {bad} inside a function"


def test_package_reads_neither_tests_nor_shared():
  for name, path in _modules().items():
    text = open(path).read()
    for needle in ('"tests"', "'tests'", "tests/", "../shared", "coco_mini"):
      assert needle not in text, f"bpnet_jax.{name} mentions {needle}"
