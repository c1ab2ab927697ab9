"""modelcache: download each model once onto node-local storage, verified, and find it instantly."""

__version__ = "0.1.0"
