"""The node agent: turns this node's LocalModelNode into verified models on local disk.

`plan` decides (pure); `observe` watches the node's LocalModelNode, the agent's config and the disk;
`tasks` runs what the plan asks (downloads, probes, adoption, verification, the peer server);
`status` reports progress and events; `agent` is the loop that ties them; `credentials` finds
source credentials the ways KServe does, `metrics` the Prometheus side.
"""
