"""Graph order for workflows, on a ``networkx.DiGraph``: the nodes the outputs need, in topological
order, and the cycles that make a workflow invalid.

Every function here is iterative (networkx's traversals keep explicit stacks), so a 10,000-node
chain needs no recursion, and each is linear in nodes + links. networkx is imported inside the
functions: the framework's import stays light, and ``ldmgraph nodes``/``plugins`` never pay for it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

Edges = Mapping[str, Iterable[str]]  # node id -> ids of the nodes it reads from (its sources)


def to_networkx(nodes: Iterable[str], sources: Edges) -> Any:
    """A ``networkx.DiGraph`` with an edge source -> consumer for each link (links to nodes that
    are not in ``nodes`` are left out: validation reports them as dangling)."""
    import networkx as nx

    graph = nx.DiGraph()
    members = list(nodes)
    graph.add_nodes_from(members)
    member_set = set(members)
    graph.add_edges_from(
        (parent, node) for node in members for parent in sources.get(node, ()) if parent in member_set
    )
    return graph


def topological_order(graph: Any) -> tuple[list[str], set[str]]:
    """``(order, left)``: a topological order of the graph's nodes (sources first); ``left`` holds
    the nodes on or behind a cycle (empty for an acyclic graph), which the order leaves out."""
    import networkx as nx

    if nx.is_directed_acyclic_graph(graph):
        return list(nx.topological_sort(graph)), set()
    # Condense the strongly connected components: a node is orderable when its component is a single
    # node without a self-loop and no cyclic component lies upstream of it.
    condensed = nx.condensation(graph)
    members = condensed.graph["mapping"]  # node -> component index
    cyclic = {
        c for c in condensed.nodes
        if len(condensed.nodes[c]["members"]) > 1
        or any(graph.has_edge(n, n) for n in condensed.nodes[c]["members"])
    }
    blocked = set(cyclic)
    for c in cyclic:
        blocked |= nx.descendants(condensed, c)
    left = {n for n in graph.nodes if members[n] in blocked}
    order = [n for n in nx.topological_sort(graph.subgraph([n for n in graph.nodes if n not in left]))]
    return order, left


def ancestors_and_self(graph: Any, roots: Iterable[str]) -> set[str]:
    """The roots and every node they (transitively) read from: one traversal from a virtual sink
    that every root feeds, so many roots cost no more than one."""
    import networkx as nx

    needed = {r for r in roots if r in graph}
    if not needed:
        return needed
    sink = ("__ldmgraph_sink__",)
    with_sink = graph.copy()
    with_sink.add_edges_from((root, sink) for root in needed)
    return needed | nx.ancestors(with_sink, sink)


def cycles(graph: Any) -> list[list[str]]:
    """One cycle per strongly connected component that has one, each as a list of node ids."""
    import networkx as nx

    found = []
    for component in nx.strongly_connected_components(graph):
        if len(component) == 1:
            (only,) = component
            if not graph.has_edge(only, only):
                continue
        found.append([edge[0] for edge in nx.find_cycle(graph.subgraph(component))])
    return sorted(found)
