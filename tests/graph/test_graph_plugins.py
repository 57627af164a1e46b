"""Plugins: isolation of broken ones, conflicts named, lazy callables, folders, entry points."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from graph_helpers import link, workflow

from ldmgraph.graph import LdmGraphError
from ldmgraph.graph.errors import PluginError
from ldmgraph.graph.executor import Executor
from ldmgraph.plugins import PLUGIN_DIR_ENV, PluginManager

GOOD = '''
from ldmgraph.graph import InputField, Node, NodeInputs, NodeOutputs, OutputField
from ldmgraph.graph.sockets import INT
from ldmgraph.plugins import hookimpl


class Triple(Node):
    """Three times x."""
    type_name = "DirTriple"
    output_node = True

    class Inputs(NodeInputs):
        x: int = InputField(INT, 1)

    class Outputs(NodeOutputs):
        value: int = OutputField(INT)

    def run(self, inputs, ctx):
        return self.Outputs(value=3 * inputs.x)


@hookimpl
def ldmgraph_nodes():
    return [Triple]


@hookimpl
def ldmgraph_samplers():
    return {"dir_sampler": "math:sqrt"}
'''

BROKEN = '''
raise RuntimeError("this plugin is broken on purpose")
'''

# a fresh node type first, then one that clashes: the plugin must register nothing at all
CLASHING = GOOD.replace("dir_sampler", "clash_sampler").replace("Three times x.", "Another triple.").replace(
    "return [Triple]", "return [Fresh, Triple]") + """

class Fresh(Triple):
    \"\"\"A new node type.\"\"\"
    type_name = "DirFresh"
"""


def plugin_folder(tmp_path: Path, **files: str) -> Path:
    folder = tmp_path / "plugins"
    folder.mkdir()
    for name, source in files.items():
        (folder / f"{name}.py").write_text(textwrap.dedent(source))
    return folder


def manager(*dirs: Path) -> PluginManager:
    return PluginManager(builtins=["ldmgraph.nodes.primitives"], entry_points_group=None, use_env=False,
                         plugin_dirs=dirs)


def test_broken_plugin_is_reported_and_the_working_one_is_usable(tmp_path: Path) -> None:
    pm = manager(plugin_folder(tmp_path, a_broken=BROKEN, b_good=GOOD))
    by_name = {Path(s.name).stem: s for s in pm.statuses if s.source == "plugin-dir"}
    assert not by_name["a_broken"].ok and "this plugin is broken on purpose" in by_name["a_broken"].error
    assert "a_broken.py:2" in by_name["a_broken"].error  # where it failed
    assert by_name["b_good"].ok and by_name["b_good"].nodes == ["DirTriple"]
    result = Executor(pm.registry).run(workflow({"t": {"type": "DirTriple", "inputs": {"x": 5}}}))
    assert result.outputs["t"]["value"] == 15


def test_cli_plugins_reports_the_broken_plugin(tmp_path: Path) -> None:
    folder = plugin_folder(tmp_path, a_broken=BROKEN, b_good=GOOD)
    run = subprocess.run([sys.executable, "-m", "ldmgraph.cli", "plugins", "--plugin-dir", str(folder)],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0
    broken_line = next(line for line in run.stdout.splitlines() if "a_broken" in line)
    assert broken_line.startswith("FAILED")
    assert "RuntimeError: this plugin is broken on purpose" in run.stdout
    assert any(line.startswith("ok") and "b_good" in line for line in run.stdout.splitlines())
    listed = json.loads(subprocess.run(
        [sys.executable, "-m", "ldmgraph.cli", "plugins", "--json", "--plugin-dir", str(folder)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path).stdout)
    assert {(Path(p["name"]).stem, p["ok"]) for p in listed if p["source"] == "plugin-dir"} == {
        ("a_broken", False), ("b_good", True)}


def test_same_node_type_from_two_plugins_is_an_error_naming_both(tmp_path: Path) -> None:
    pm = manager(plugin_folder(tmp_path, first=GOOD, second=CLASHING))
    first, second = (s for s in pm.statuses if s.source == "plugin-dir")
    assert first.ok and not second.ok
    assert "'DirTriple'" in second.error and first.name in second.error and second.name in second.error
    assert pm.registry.nodes["DirTriple"].__doc__ == "Three times x."  # never silently overridden
    assert "clash_sampler" not in pm.registry.samplers  # the clashing plugin registers nothing
    assert "DirFresh" not in pm.registry.nodes and second.nodes == []


def test_lazy_callables_resolve_on_first_use(tmp_path: Path) -> None:
    pm = manager(plugin_folder(tmp_path, good=GOOD))
    assert pm.registry.samplers["dir_sampler"] == "math:sqrt"  # not imported yet
    assert pm.registry.resolve("samplers", "dir_sampler") is math.sqrt
    assert "dir_sampler" in pm.registry.choices("samplers")
    with pytest.raises(LdmGraphError, match="did you mean dir_sampler"):
        pm.registry.resolve("samplers", "dir_samplr")


def test_a_builtin_module_that_fails_to_import_is_an_error() -> None:
    with pytest.raises(PluginError, match=r"built-in plugin module ldmgraph.nodes.not_written_yet cannot be imported"):
        PluginManager(builtins=["ldmgraph.nodes.image", "ldmgraph.nodes.not_written_yet"],
                      entry_points_group=None, use_env=False)


def test_builtins_load_through_ldmgraphs_own_entry_points() -> None:
    from importlib.metadata import entry_points

    own = {ep.value for ep in entry_points(group="ldmgraph") if ep.dist is not None and ep.dist.name == "ldmgraph"}
    assert {"ldmgraph.nodes.conditioning", "ldmgraph.nodes.controlnet", "ldmgraph.diffusion.registry"} <= own
    pm = PluginManager(use_env=False)
    builtin = {s.name for s in pm.statuses if s.source == "builtin"}
    assert builtin == own and all(s.ok for s in pm.statuses if s.source == "builtin")
    assert pm.registry.owner("conditioner", "TextEncode") == "ldmgraph.nodes.conditioning"


MISSPELT = """
from ldmgraph.plugins import hookimpl

@hookimpl
def ldmgraph_node():
    return []
"""

CLAIMS_BUILTIN = """
from ldmgraph.nodes.image import LoadImage
from ldmgraph.plugins import hookimpl

@hookimpl
def ldmgraph_nodes():
    return [LoadImage]
"""

SLOW = """
import time
time.sleep(3.5)
from ldmgraph.plugins import hookimpl

@hookimpl
def ldmgraph_samplers():
    return {"slow_sampler": "math:sqrt"}
"""


def _single(tmp_path: Path, name: str, source: str) -> Path:
    folder = tmp_path / "plugins"
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.py").write_text(source)
    return folder


def test_a_misspelt_hook_name_is_an_error_naming_the_hook(tmp_path: Path) -> None:
    pm = PluginManager(entry_points_group=None, use_env=False, plugin_dirs=[_single(tmp_path, "typo", MISSPELT)])
    status = next(s for s in pm.statuses if s.name.endswith("typo.py"))
    assert not status.ok
    assert "'ldmgraph_node', which is not an ldmgraph hook; did you mean ldmgraph_nodes?" in status.error


def test_a_plugin_cannot_claim_a_builtin_node_class(tmp_path: Path) -> None:
    pm = PluginManager(entry_points_group=None, use_env=False,
                       plugin_dirs=[_single(tmp_path, "thief", CLAIMS_BUILTIN)])
    status = next(s for s in pm.statuses if s.name.endswith("thief.py"))
    assert not status.ok and "'LoadImage' is built into ldmgraph" in status.error
    assert pm.registry.owner("node type", "LoadImage") == "ldmgraph.nodes.image"
    described = json.loads(subprocess.run(
        [sys.executable, "-m", "ldmgraph.cli", "nodes", "--json", "--plugin-dir", str(tmp_path / "plugins")],
        capture_output=True, text=True, check=True).stdout)
    entry = described["LoadImage"] if isinstance(described, dict) else next(n for n in described if n["type"] == "LoadImage")
    assert "thief" not in json.dumps(entry)


def test_a_slow_plugin_import_is_reported_by_name_and_timed(tmp_path: Path) -> None:
    reports: list[tuple[str, float]] = []
    pm = PluginManager(entry_points_group=None, use_env=False, plugin_dirs=[_single(tmp_path, "sleepy", SLOW)],
                       on_slow=lambda name, seconds: reports.append((name, seconds)))
    status = next(s for s in pm.statuses if s.name.endswith("sleepy.py"))
    assert status.ok and status.seconds >= 3.5
    assert len(reports) == 1 and reports[0][0].endswith("sleepy.py")
    listing = subprocess.run([sys.executable, "-m", "ldmgraph.cli", "plugins", "--plugin-dir", str(tmp_path / "plugins")],
                             capture_output=True, text=True, check=True)
    assert "sleepy.py is still importing after 3 s" in listing.stderr
    line = next(x for x in listing.stdout.splitlines() if "sleepy.py" in x)
    assert float(line.rsplit("; ", 1)[1].split(" s)")[0]) >= 3.5


def test_plugin_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PLUGIN_DIR_ENV, str(plugin_folder(tmp_path, good=GOOD)))
    pm = PluginManager(builtins=[], entry_points_group=None)
    assert "DirTriple" in pm.registry.nodes


def test_plugin_returning_garbage_is_reported(tmp_path: Path) -> None:
    garbage = "from ldmgraph.plugins import hookimpl\n\n@hookimpl\ndef ldmgraph_nodes():\n    return [42]\n"
    pm = manager(plugin_folder(tmp_path, garbage=garbage))
    [status] = [s for s in pm.statuses if s.source == "plugin-dir"]
    assert not status.ok and "not a Node subclass" in status.error


def test_plugin_sampler_appears_in_enum_choices_of_nodes(registry) -> None:
    from graph_helpers import make_registry

    reg = make_registry()
    choices = reg.nodes["TPick"].spec.describe(reg)["inputs"]["sampler"]["choices"]
    assert choices == ["test_sampler", "other_sampler"]
    doc = workflow({"p": {"type": "TPick", "inputs": {"sampler": "other_sampler"}},
                    "c": {"type": "TConst", "inputs": {}}, "s": {"type": "TSink", "inputs": {"x": link("c")}}})
    assert Executor(reg).run(doc).outputs["p"]["value"] == "other_sampler"


def test_package_folder_plugin(tmp_path: Path) -> None:
    package = tmp_path / "plugins" / "pkg_plugin"
    package.mkdir(parents=True)
    (package / "nodes.py").write_text(textwrap.dedent(GOOD))
    (package / "__init__.py").write_text("from .nodes import ldmgraph_nodes, ldmgraph_samplers  # noqa: F401\n")
    pm = manager(tmp_path / "plugins")
    [status] = [s for s in pm.statuses if s.source == "plugin-dir"]
    assert status.ok and status.nodes == ["DirTriple"] and status.samplers == ["dir_sampler"]
