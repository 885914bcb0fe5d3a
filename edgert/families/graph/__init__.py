"""Plain ONNX/TFLite graphs: `build` (the runtime task is the shared `edgert.runtime.graph.open_graph`)."""
