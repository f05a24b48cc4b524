"""The torch-free serving core: the bundle contract, scoring (the numpy fusion twin, inner products), the exact top-k
search and the ONNX Runtime towers. Index building, benchmarks and the service sit on top of it."""
