"""lasad_train: data, tokenizer and GPT training (single process and torchrun)."""
