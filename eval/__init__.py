"""Evaluation: zero-shot and retrieval metrics and reports, benchmark loaders, the synthetic
dataset and the demo."""

from eval.benchmarks import ClassificationSet, RetrievalSet, load_benchmark
from eval.evaluate import EvalConfig, EvalReport, evaluate
from eval.metrics import retrieval_recall, zero_shot_accuracy

__all__ = ["ClassificationSet", "RetrievalSet", "load_benchmark", "EvalConfig", "EvalReport",
           "evaluate", "retrieval_recall", "zero_shot_accuracy"]  # fmt: skip
