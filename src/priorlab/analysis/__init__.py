"""Loading study results, aggregation over seeds with confidence intervals, figures and the report."""
