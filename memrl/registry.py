"""The fixed vocabularies of memrl's settings and metrics, in one light module.

``load_config`` validates against these lists without importing the modules that implement them
(those import torch, diffusers and faiss); each implementing module imports its list from here.
"""

from __future__ import annotations

__all__ = ["BACKENDS", "ENCODER_KINDS", "FAISS_INDEXES", "GRANULARITIES", "METHODS", "METRICS", "NN_BACKENDS"]

BACKENDS = ("inprocess", "subprocess", "ray", "replay")
"""``env.backend``: where evaluations run (``memrl.backends``)."""
ENCODER_KINDS = ("contrastive", "shipped", "inception", "torchscript", "pixel")
"""``encoder.kind`` (``memrl.encoders``)."""
METHODS = ("full", "attention", "bias_norm", "difffit", "lora", "svdiff")
"""``search.method``: what unfreezing a group means (``memrl.peft_methods``)."""
GRANULARITIES = ("block", "transformer", "layer")
"""``search.granularity``: how the UNet is cut into groups (``memrl.search_space``)."""
NN_BACKENDS = ("faiss", "torch")
"""``metrics.index``: nearest-neighbour backend (``memrl.metrics.memorization``)."""
FAISS_INDEXES = ("flat", "ivf", "hnsw")
"""``metrics.faiss_index``."""

METRICS = (
    "heldout_loss",
    "train_loss",
    "canary_loss",
    "loss_gap",
    "canary_loss_gap",
    "canary_log_loss_ratio",
    "mia_auc_canary",
    "mia_tpr_canary",
    "mia_auc_private",
    "mia_tpr_private",
    "mia_auc_noncanary",
    "mia_tpr_noncanary",
    "loss_low_tail",
    "nn_similarity_mean",
    "nn_similarity_q50",
    "nn_similarity_q95",
    "near_copy_fraction",
    "amd",
    "distinct_copied",
    "canary_copy_fraction",
    "copy_threshold",
    "extracted",
    "extraction_threshold",
    "extraction_match_fraction",
    "fid",
    "kid",
    "kid_std",
    "noise_norm_canary",
    "noise_norm_heldout",
    "finetune_loss",
    "trainable_params",
    "trainable_fraction",
    "group_fraction",
)
"""Every metric an evaluation measures (``memrl.scoring.score_model``; a test checks the two
agree): the names ``reward.memorization`` and ``reward.quality`` may take."""
