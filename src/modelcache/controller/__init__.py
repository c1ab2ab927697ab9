"""The controller manager: KServe's LocalModel* reconciliation, level-based.

`reconcile` holds every decision as pure functions over plain data (observed state in, a `Plan` out);
`handlers` is the kopf wiring (indexes and event handlers), `apply` executes a plan against the API
server, `leader` keeps two replicas from acting at once, and `main` ties them together.
"""
