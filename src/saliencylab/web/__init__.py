"""`saliencylab serve`: a local browser workbench and HTTP API over the library (needs the `[web]` extra)."""
