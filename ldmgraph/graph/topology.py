"""Graph order for workflows: the nodes the outputs need, in topological order, in linear time.

Kahn's algorithm (Kahn 1962, "Topological sorting of large networks"), iterative, so a
10,000-node chain needs no recursion. It is stdlib-only on purpose: importing networkx alone
costs 130-270 ms here, a large share of the 1 s that ``ldmgraph validate`` may take, so networkx is
imported only to explain a cycle (strongly connected components, one cycle named per component)
and to export a workflow as a ``networkx.DiGraph`` for tools (:func:`to_networkx`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

Edges = Mapping[str, Iterable[str]]  # node id -> ids of the nodes it reads from (its sources)


def ancestors_and_self(sources: Edges, roots: Iterable[str]) -> set[str]:
    """The roots and every node they (transitively) read from."""
    needed = set(roots)
    stack = list(needed)
    while stack:
        for parent in sources.get(stack.pop(), ()):
            if parent not in needed:
                needed.add(parent)
                stack.append(parent)
    return needed


def topological_order(nodes: Iterable[str], sources: Edges) -> tuple[list[str], set[str]]:
    """``(order, left)``: a topological order of ``nodes`` (sources first, ties in the given order);
    ``left`` holds the nodes on or behind a cycle (empty for an acyclic graph)."""
    members = list(nodes)
    member_set = set(members)
    indegree = dict.fromkeys(members, 0)
    children: dict[str, list[str]] = {n: [] for n in members}
    for node in members:
        for parent in set(sources.get(node, ())):
            if parent in member_set:
                indegree[node] += 1
                children[parent].append(node)
    ready = deque(n for n in members if indegree[n] == 0)
    order: list[str] = []
    while ready:
        node = ready.popleft()
        order.append(node)
        for child in children[node]:
            indegree[child] -= 1
            if indegree[child] == 0:
                ready.append(child)
    left = {n for n in members if indegree[n] > 0}
    return order, left


def cycles(nodes: Iterable[str], sources: Edges) -> list[list[str]]:
    """One cycle per strongly connected component that has one, each as a list of node ids."""
    graph = to_networkx(nodes, sources)
    import networkx as nx

    found = []
    for component in nx.strongly_connected_components(graph):
        if len(component) == 1:
            (only,) = component
            if not graph.has_edge(only, only):
                continue
        found.append([edge[0] for edge in nx.find_cycle(graph.subgraph(component))])
    return sorted(found)


def to_networkx(nodes: Iterable[str], sources: Edges) -> Any:
    """A ``networkx.DiGraph`` with an edge source -> consumer for each link."""
    import networkx as nx

    graph = nx.DiGraph()
    members = list(nodes)
    graph.add_nodes_from(members)
    for node in members:
        for parent in sources.get(node, ()):
            graph.add_edge(parent, node)
    return graph
