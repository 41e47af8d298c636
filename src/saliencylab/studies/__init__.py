"""The article's studies as pipelines that the CLI and the demo call."""
