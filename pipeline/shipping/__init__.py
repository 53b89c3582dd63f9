"""Stage 3: the fitted head shipped as a model people load, and that model used. One module per job:

- `model`: TransferModel, the network every format holds (exact preprocessing + backbone + Linear);
- `formats`: writing and loading model.pt, model.onnx and model.pt2, and running any of them;
- `parity`: the checks against scikit-learn that every export passes before a file is kept;
- `export`: head.pt and the model files, checked, then renamed into place;
- `predict`: a loaded model over image files and folders.
"""
