"""Evaluation on stored embeddings (linear probe, weighted kNN), white-box diagnostics, plots, reports."""
from cratescale.evaluation.diagnostics import (coding_rate, reconstructions, run_diagnostics, sparsity_stats,
                                               subspace_coding_rate)
from cratescale.evaluation.knn import knn_eval, knn_predict
from cratescale.evaluation.probe import linear_probe
from cratescale.evaluation.protocol import evaluate_store
from cratescale.evaluation.report import evaluate, results_table, write_report

__all__ = ["coding_rate", "evaluate", "evaluate_store", "knn_eval", "knn_predict", "linear_probe",
           "reconstructions", "results_table", "run_diagnostics", "sparsity_stats", "subspace_coding_rate",
           "write_report"]
