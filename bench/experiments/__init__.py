"""One-off measurements behind decisions in docs/performance.md; not part of ``python -m bench``."""
