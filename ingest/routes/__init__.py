"""One module per dialect (seed document), plus the edge's own health routes."""
