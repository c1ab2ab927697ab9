"""The node agent: turns this node's LocalModelNode into verified models on local disk.

`plan` decides (pure), `credentials` finds source credentials the ways KServe does, `agent` is the
loop at the Kubernetes/disk edge, `metrics` the Prometheus side.
"""
