"""Evaluation: image-quality metrics and (with the pipelines) the Table-1 benchmark."""
