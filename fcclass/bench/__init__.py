"""`fcclass bench`: fcclass's training loop against a plain PyTorch loop, Keras and the machine's peak (``runner``)."""
