"""Classification metrics (with confidence intervals) and, later, explanation metrics."""
