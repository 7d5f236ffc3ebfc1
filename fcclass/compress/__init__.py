"""`fcclass compress`: pruning, fine-tuning and int8 quantization of a trained run into a new run (``run``)."""
