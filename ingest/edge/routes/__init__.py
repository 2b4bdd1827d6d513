"""One module per dialect (seed document): what each route says in its own shape."""
