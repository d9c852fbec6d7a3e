"""The book's three training recipes as plain functions: pretrain, fine-tune a classifier, fine-tune
on instructions.

Each takes validated settings (a gpt_core.settings dataclass), its data and an output folder, and
returns a result object; an optional `logger` (gpt_core.tracking.MetricLogger) receives metrics.
They never import Prefect or MLflow: the pipeline's stages in flows/ call them, and so can a
notebook, a script or torchrun.
"""
