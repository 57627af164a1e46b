"""Import of other tools' workflow formats into ldmgraph's own (`ldmgraph/1`).

`ldmgraph.interop.comfyui.to_workflow(doc)` converts a ComfyUI graph, API format or UI format, into a
workflow document; `ldmgraph import FILE -o OUT.json` is its command-line face (`interop/cli.py`).
Nothing here imports torch: importing is a pure transformation of JSON documents.
"""
