"""MISSRec: multi-modal interest-aware sequential recommendation (model, training, evaluation)."""
