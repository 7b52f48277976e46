"""`mlops compress`: smaller checkpoints, the same kind of artefact out as in, with what it cost measured.

- `half.run(ref, HalfOptions) -> HalfReport`: fp32 -> fp16/bf16 (`half_onnx` for ONNX graphs);
- `int8.run(ref, Int8Options) -> Int8Report`: dynamic int8 quantisation (`int8_onnx` for ONNX graphs).

Shared by both: `shared` (refusals made before any work, the drift check's inputs, folders and sizes on disk);
used by `half`: `keep` (which tensors stay as they are), `cast` (counted casts), `stream` (safetensors converted
through a memory map), `drift` (per-layer comparison).
"""
