"""Exporting a trained captioner for deployment without seesay's training code.

`seesay.export.onnx.export_onnx(checkpoint, output)` writes ONNX graphs (the encoder, the
decoder's `init_state` and its `step`) with the tokenizer, the preprocessing and a JSON layout of
the decoder state; `seesay.export.runtime.OnnxCaptioner` runs them with onnxruntime through
seesay's own decoding (`seesay.decoding.decode`). See docs/export.md.
"""
