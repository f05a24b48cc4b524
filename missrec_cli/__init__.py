"""The top-level ``missrec`` command: composes the model, export, index and service packages (imports flow one way)."""
