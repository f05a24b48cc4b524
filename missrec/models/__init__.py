"""The models, one family per module (model + config; see missrec.families), the popularity baseline and
checkpoints."""
