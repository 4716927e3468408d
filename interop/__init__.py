"""Hugging Face interop: checkpoints and tokenizers in (`import_hf`) and out (`export_hf`)."""
