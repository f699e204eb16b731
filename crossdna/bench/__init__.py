"""Performance tooling: the training-step benchmark (``crossdna bench train-step``) and model compilation."""
