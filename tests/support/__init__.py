"""Test-support code: real local servers and helpers shared by unit and integration tests.

Kept import-free on purpose so ``python -m tests.support.origin`` does not import the
module twice (runpy warns when a package ``__init__`` pre-imports the ``-m`` target).
"""
