"""ONNX export: one export spec per submodel, one shared export function, graph checks."""
