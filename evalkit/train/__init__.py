"""Bundled minimal trainers; each stage module reads top to bottom (DESIGN.md)."""
