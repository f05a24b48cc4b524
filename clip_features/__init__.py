"""CLIP features of items, the same offline (``missrec prepare``) and online (cold-start ingestion): the image gate,
explicit preprocessing and the BPE tokenizer (:mod:`clip_features.preprocess`, torch-free), the encoders on ONNX
Runtime (:mod:`clip_features.onnx_encoder`, torch-free) and on open_clip (:mod:`clip_features.torch_encoder`,
torch). The ONNX graphs are written by ``missrec export-clip`` (:mod:`model_export.clip`)."""
