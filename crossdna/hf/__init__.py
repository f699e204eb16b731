"""Model files: the consolidated weights format and model-source resolver (weights), the HuggingFace exporter
(export), the upstream importer (importer), and the wrapper modules that ship inside every export
(configuration_crossdna, modeling_crossdna, tokenization_crossdna: they import only torch, transformers and the
backbone). See docs/finetuning.md."""
