"""The pipeline benchmark (`make bench`, `headbench bench`, `python -m bench`)."""
