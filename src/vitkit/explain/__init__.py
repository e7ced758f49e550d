"""Seeing inside a ViT: the paper's analysis figures (Sec. 4.5) and an illustrated walkthrough.

`analysis` computes the numbers (numpy arrays, usable from a notebook), `figures` draws them with
matplotlib, `report` runs a model on images and writes the PNGs plus one self-contained HTML page.
"""

from .analysis import (FUSIONS, AttentionRecord, TopPredictions, attention_rollout, class_attention,
                       collect_attention, embedding_filters, mean_attention_distance, patch_grid,
                       position_similarity, rollout_matrix, top_predictions, uniform_attention_distance,
                       unnormalize)
from .report import ExplainResult, explain

__all__ = ["explain", "ExplainResult", "AttentionRecord", "TopPredictions", "FUSIONS", "unnormalize", "patch_grid",
           "embedding_filters", "position_similarity", "collect_attention", "mean_attention_distance",
           "uniform_attention_distance", "class_attention", "rollout_matrix", "attention_rollout", "top_predictions"]
