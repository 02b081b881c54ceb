"""The repository's shape: the paper's files alone at the root, the machinery in folders, and the rules the
imports keep (the paper's files import no folder, no cycle, no script imports another, no test-only package
at run time), read from the source files with ast; and one step of the paper's run, traced, runs in four files."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = {"model", "pool", "losses", "concepts", "data", "train", "eval"}  # the root: the files read beside the paper
CORE = {"model", "pool", "losses", "concepts"}  # the method itself: they import nothing of the machinery
FOLDERS = ["baselines", "bench", "evaluation", "exercises", "released", "run", "sources", "study"]
SCRIPTS = {
    "train",
    "eval",
    "study.sweep",
    "study.compare",
    "sources.precompute",
    "exercises.measure",
}  # (a module with a small CLI may be imported)
TEST_ONLY = {
    "open_clip",
    "ftfy",
    "regex",
    "webdataset",
    "sentencepiece",
    "google",
    "safetensors",
    "timm",
    "transformers",
}


def modules() -> dict[str, str]:
    """{dotted module name: path} of every file of the project but the tests."""
    found = {name[:-3]: os.path.join(ROOT, name) for name in os.listdir(ROOT) if name.endswith(".py")}
    for folder in FOLDERS:
        for name in os.listdir(os.path.join(ROOT, folder)):
            if name.endswith(".py") and name != "__init__.py":
                found[f"{folder}.{name[:-3]}"] = os.path.join(ROOT, folder, name)
    return found


def imports(path: str) -> set[str]:
    """The modules a file imports, by their full dotted names ("from run import scale" gives run.scale too)."""
    tree, out = ast.parse(open(path).read()), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return out


def project_graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(path) & set(found) for name, path in found.items()}


def test_the_root_holds_the_paper_and_every_folder_says_what_it_holds():
    assert {n[:-3] for n in os.listdir(ROOT) if n.endswith(".py")} == PAPER
    for folder in FOLDERS:
        doc = ast.get_docstring(ast.parse(open(os.path.join(ROOT, folder, "__init__.py")).read()))
        assert doc and len(doc.splitlines()) >= 3, folder  # a few lines, then the files it holds
        for name in os.listdir(os.path.join(ROOT, folder)):
            if name.endswith(".py") and name != "__init__.py":
                assert name in doc, (folder, name)


def test_the_paper_files_import_no_machinery():
    graph = project_graph()
    for name in CORE:
        assert graph[name] <= CORE, (name, graph[name] - CORE)


def test_no_import_cycle_and_no_script_imports_another():
    graph = project_graph()
    state = {}

    def visit(name, path):
        assert state.get(name) != "open", " -> ".join([*path, name])
        if state.get(name) is None:
            state[name] = "open"
            for other in graph[name]:
                visit(other, [*path, name])
            state[name] = "done"

    for name in graph:
        visit(name, [])
    for name, imported in graph.items():
        assert not imported & SCRIPTS, (name, imported & SCRIPTS)


def test_imports_between_folders_run_one_way():
    """The folders form layers: what one folder imports from another, the other never imports back, through any
    chain of folders (sources/ and released/ below run/, evaluation/ below run/, study/ and bench/ on top)."""
    folder = lambda name: name.split(".")[0] if "." in name else "root"  # noqa: E731
    edges = {(folder(a), folder(b)) for a, imported in project_graph().items() for b in imported}
    edges = {(a, b) for a, b in edges if a != b and "root" not in (a, b)}
    reach = {a: {b for x, b in edges if x == a} for a, _ in edges}
    for _ in range(len(FOLDERS)):  # the transitive closure
        reach = {a: seen | {c for b in seen for c in reach.get(b, ())} for a, seen in reach.items()}
    assert not [a for a, seen in reach.items() if a in seen], {a: sorted(s) for a, s in reach.items() if a in s}


def test_no_run_time_imports_of_test_only_packages():
    for name, path in modules().items():
        if not name.startswith("bench."):  # the speed benchmarks compare with open_clip when it is installed
            assert not {m.split(".")[0] for m in imports(path)} & TEST_ONLY, name


def test_one_step_of_the_papers_run_reads_in_four_files():
    """train.py's `step` on one process, no accumulation, the paper's flags: every function of the project it
    runs is in train.py, model.py, losses.py or pool.py (the batch was made before, by data.py)."""
    import sys
    from types import SimpleNamespace

    import torch

    import train
    from data import Collate, WordTokenizer
    from fixtures import step_args
    from model import CLIP, CLIPConfig, TextConfig, VisionConfig
    from sources.shapes import ShapesDataset, ShapesWorld

    data = ShapesDataset(ShapesWorld(), seed=0, split="train", length=4)
    samples = [data[i] for i in range(4)]
    batch = Collate(WordTokenizer.build([s["caption"] for s in samples], context_length=48))(samples)
    vision = VisionConfig(image_size=64, patch_size=16, width=32, layers=1, heads=2)
    model = CLIP(CLIPConfig(vision=vision, text=TextConfig(width=32, layers=1, heads=2), embed_dim=16))
    args = step_args("c2lip")
    optimizer = torch.optim.AdamW(train.param_groups(model, 1e-3, None, 0.1), lr=1e-3)
    run = SimpleNamespace(net=model, model=model, optimizer=optimizer, dtype=torch.float32)
    objective = train.objective_of(args, train.embed, train.loss_of)
    assert objective == (train.embed, train.loss_of)  # the paper's flags: train.py's own pair

    files, project = set(), set(modules().values())  # not a virtual environment kept inside the checkout

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_filename in project:
            files.add(os.path.relpath(frame.f_code.co_filename, ROOT))

    sys.setprofile(profile)
    try:
        loss, terms, applied = train.step(run, [batch], 0.5, args, objective)
    finally:
        sys.setprofile(None)
    assert applied and set(terms) == {"L_sig", "L_npc", "L_xac"}
    assert files == {"train.py", "model.py", "losses.py", "pool.py"}, files
