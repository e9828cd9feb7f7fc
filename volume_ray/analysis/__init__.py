"""Reading answers out of a results store: trends, ranks, cutoffs, figures, a report."""
