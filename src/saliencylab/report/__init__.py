"""The self-contained HTML report (templates + writer)."""
