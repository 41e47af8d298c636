"""Metrics: classification (with confidence intervals) and explanation checks (localisation, faithfulness,
sanity by randomisation, stability, similarity of maps, shortcut probes), one module per family."""
