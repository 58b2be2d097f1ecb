"""TensorRT: ONNX -> plan builder, engine cache keyed per GPU, TensorRT runner. TensorRT is imported lazily."""
