"""Command line: typer commands only; the logic lives in the engine and the store."""
